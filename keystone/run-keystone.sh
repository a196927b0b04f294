#!/usr/bin/env bash
# Runs a regional validating Keystone under gunicorn, in the foreground (exec: the
# caller's SIGTERM reaches gunicorn, which stops its workers gracefully).
#
# Usage: keystone/run-keystone.sh --config FILE [--bind ADDR] [--workers N]
#                                 [--venv DIR] [-- GUNICORN_ARGS...]
#   --config   keystone.conf (or OS_KEYSTONE_CONFIG_FILES, ';'-separated)
#   --bind     listen address, default 127.0.0.1:5000 (KEYSTONE_BIND)
#   --workers  sync worker processes, default the CPU count (KEYSTONE_WORKERS);
#              budget ~130 MiB each; an uncached validation costs ~330 ms of CPU
#   --venv     the virtualenv from setup-venv.sh (FERNETD_KEYSTONE_VENV,
#              default target/keystone-venv next to this bundle)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
config=${OS_KEYSTONE_CONFIG_FILES:-}
bind=${KEYSTONE_BIND:-127.0.0.1:5000}
workers=${KEYSTONE_WORKERS:-$(nproc)}
venv=${FERNETD_KEYSTONE_VENV:-$(dirname "$here")/target/keystone-venv}
usage() { sed -n '5,12s/^# \{0,1\}//p' "$0" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --config) [ $# -ge 2 ] || usage; config=$2; shift 2 ;;
    --bind) [ $# -ge 2 ] || usage; bind=$2; shift 2 ;;
    --workers) [ $# -ge 2 ] || usage; workers=$2; shift 2 ;;
    --venv) [ $# -ge 2 ] || usage; venv=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "run-keystone: unknown argument $1" >&2; usage ;;
  esac
done
[ -n "$config" ] || { echo "run-keystone: no configuration: pass --config FILE or set OS_KEYSTONE_CONFIG_FILES" >&2; exit 2; }
IFS=';' read -r -a files <<<"$config"
for f in "${files[@]}"; do
  [ -r "$f" ] || { echo "run-keystone: cannot read Keystone configuration $f" >&2; exit 2; }
done
case $workers in ''|*[!0-9]*|0) echo "run-keystone: --workers must be a positive integer, not '$workers'" >&2; exit 2 ;; esac
[ -x "$venv/bin/gunicorn" ] || { echo "run-keystone: no gunicorn in $venv; run keystone/setup-venv.sh $venv" >&2; exit 2; }

export OS_KEYSTONE_CONFIG_FILES=$config
# Keystone would otherwise look in OS_KEYSTONE_CONFIG_DIR too; be explicit.
unset OS_KEYSTONE_CONFIG_DIR
# Every Keystone import prints eventlet's deprecation warning; it is noise here.
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::DeprecationWarning}
# --no-control-socket: gunicorn 27 otherwise creates a folder in $HOME (read-only
# under systemd's ProtectHome). Access log to stdout, errors to stderr: the journal.
exec "$venv/bin/gunicorn" \
  --no-control-socket \
  --bind "$bind" \
  --workers "$workers" \
  --worker-class sync \
  --timeout 60 \
  --graceful-timeout 30 \
  --pythonpath "$here" \
  --access-logfile - \
  --error-logfile - \
  "$@" \
  fernetd_keystone_wsgi:application
