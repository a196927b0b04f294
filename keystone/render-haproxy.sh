#!/usr/bin/env bash
# Renders keystone/haproxy.cfg.template to standard output: one region's VIP in
# front of its controllers' Keystones, health-checked on GET /v3.
# Usage: keystone/render-haproxy.sh [--template FILE] VIP=ADDRESS:PORT
#            SERVER=NAME=ADDRESS:PORT... [BACKUP=NAME=ADDRESS:PORT...] > haproxy.cfg
# --template: another haproxy template of this bundle (haproxy-global.cfg.template,
# haproxy-identity-db.cfg.template). BACKUP servers get haproxy's `backup` flag.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
template=$here/haproxy.cfg.template
if [ "${1:-}" = --template ]; then
  [ $# -ge 2 ] || { echo "render-haproxy: --template needs a file name" >&2; exit 2; }
  template=$here/$(basename "$2")
  [ -r "$template" ] || { echo "render-haproxy: no template $2 in $here" >&2; exit 2; }
  shift 2
fi
vip=
servers=
for arg in "$@"; do
  case $arg in
    VIP=*) vip=${arg#VIP=} ;;
    SERVER=*=*|BACKUP=*=*)
      kind=${arg%%=*}
      spec=${arg#*=}
      name=${spec%%=*}
      addr=${spec#*=}
      [[ $name =~ ^[A-Za-z0-9._-]+$ ]] || { echo "render-haproxy: bad server name '$name'" >&2; exit 2; }
      [[ $addr =~ ^[^[:space:]]+:[0-9]+$ ]] || { echo "render-haproxy: bad address '$addr' (ADDRESS:PORT)" >&2; exit 2; }
      flags=check
      [ "$kind" = SERVER ] || flags="check backup"
      servers+="    server $name $addr $flags"$'\n' ;;
    *) echo "render-haproxy: expected VIP=ADDRESS:PORT, SERVER=NAME=ADDRESS:PORT or BACKUP=NAME=ADDRESS:PORT, got '$arg'" >&2; exit 2 ;;
  esac
done
[ -n "$vip" ] || { echo "render-haproxy: VIP=ADDRESS:PORT is required" >&2; exit 2; }
[ -n "$servers" ] || { echo "render-haproxy: at least one SERVER=NAME=ADDRESS:PORT is required" >&2; exit 2; }
text=$(<"$template")
text=${text//"@VIP@"/"$vip"}
text=${text//"@SERVERS@"/"${servers%$'\n'}"}
printf '%s\n' "$text"
