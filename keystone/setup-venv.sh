#!/usr/bin/env bash
# Makes (or reuses) the project's Python virtualenv with the pinned Keystone.
# Idempotent: a stamp holding the requirements' checksum says the venv is complete,
# so an interrupted install is redone rather than trusted.
# Usage: keystone/setup-venv.sh [VENV_DIR]   (default: target/keystone-venv)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
venv=${1:-${FERNETD_KEYSTONE_VENV:-$root/target/keystone-venv}}
req=$here/requirements.txt
want=$(sha256sum "$req" | cut -d' ' -f1)
stamp=$venv/.fernetd-stamp
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/keystone-manage" ]; then
  echo "$venv"
  exit 0
fi
python=${PYTHON:-python3}
command -v "$python" >/dev/null || { echo "setup-venv: $python not found; install Python 3.10+ (apt-get install python3 python3-venv)" >&2; exit 3; }
mkdir -p "$(dirname "$venv")"
lock=$venv.lock
exec 9>"$lock"
flock 9
# Another process may have finished the job while we waited for the lock.
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/keystone-manage" ]; then
  echo "$venv"
  exit 0
fi
rm -rf "$venv"
"$python" -m venv "$venv" >&2
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req" >&2
"$venv/bin/python" -c 'import keystone.common.fernet_utils, keystone.token.token_formatters' >&2
echo "$want" > "$stamp"
echo "$venv"
