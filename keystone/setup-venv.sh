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

# A bare Debian/Ubuntu machine has python3 without venv/ensurepip (or no python3 at
# all). As root we install what is missing with apt-get; otherwise we say what to run.
apt_install() {
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "setup-venv: missing $*; install it (as root: apt-get install -y $*) or set PYTHON" >&2
    exit 3
  fi
  echo "setup-venv: installing $* with apt-get" >&2
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "$@" >&2 ||
    { apt-get -o DPkg::Lock::Timeout=600 update >&2 && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "$@" >&2; }
}
if ! command -v "$python" >/dev/null; then
  [ "$python" = python3 ] || { echo "setup-venv: $python not found" >&2; exit 3; }
  apt_install python3 python3-venv
fi
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
  { echo "setup-venv: $("$python" --version 2>&1) is too old; Keystone 30.0.0 needs Python 3.10+" >&2; exit 3; }
if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
  # Debian splits these out; the versioned package is the one that carries ensurepip.
  ver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  apt_install python3-venv "python$ver-venv"
fi
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
