#!/usr/bin/env bash
# Brings the cloud fernetd is for up on this host, for evaluation: 3 Galera nodes,
# 3 regions (RegionOne with 2 controllers behind its VIP), a memcached and a
# keystonemiddleware-protected service per region, the global identity VIP, and
# fernetd's rotator with one agent per controller, every process real, on
# 127.0.0.1 only. Prints the endpoints and an openstack credential file; Ctrl-C
# tears everything down.
#
# Usage: keystone/eval-cloud.sh [--fernetd PATH] [--dir DIR] [--keep] [--help]
#   Needs root and Debian/Ubuntu; installs what is missing (mariadb-server,
#   galera-4, rsync, memcached, haproxy with apt-get; the Keystone virtualenv
#   with pip from keystone/requirements.txt) and says so.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
for a in "$@"; do
  case $a in -h|--help) sed -n '2,12s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
done
[ "$(id -u)" -eq 0 ] ||
  { echo "eval-cloud: refused: must run as root (it installs packages and runs MariaDB as mysql)" >&2; exit 2; }
venv=${FERNETD_KEYSTONE_VENV:-$(dirname "$here")/target/keystone-venv}
want=$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)
if [ "$(cat "$venv/.fernetd-stamp" 2>/dev/null)" != "$want" ]; then
  echo "eval-cloud: installing the Keystone virtualenv (pip install -r keystone/requirements.txt) in $venv" >&2
fi
venv=$(bash "$here/setup-venv.sh" "$venv") ||
  { echo "eval-cloud: refused: cannot make the Keystone virtualenv (is PyPI reachable?)" >&2; exit 2; }
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
exec "$venv/bin/python" "$here/evalcloud.py" "$@"
