#!/usr/bin/env bash
# Renders keystone/haproxy.cfg.template to standard output: one region's VIP in
# front of its controllers' Keystones, health-checked on GET /v3.
# Usage: keystone/render-haproxy.sh VIP=ADDRESS:PORT SERVER=NAME=ADDRESS:PORT... > haproxy.cfg
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
vip=
servers=
for arg in "$@"; do
  case $arg in
    VIP=*) vip=${arg#VIP=} ;;
    SERVER=*=*)
      spec=${arg#SERVER=}
      name=${spec%%=*}
      addr=${spec#*=}
      [[ $name =~ ^[A-Za-z0-9._-]+$ ]] || { echo "render-haproxy: bad server name '$name'" >&2; exit 2; }
      [[ $addr =~ ^[^[:space:]]+:[0-9]+$ ]] || { echo "render-haproxy: bad address '$addr' (ADDRESS:PORT)" >&2; exit 2; }
      servers+="    server $name $addr check"$'\n' ;;
    *) echo "render-haproxy: expected VIP=ADDRESS:PORT or SERVER=NAME=ADDRESS:PORT, got '$arg'" >&2; exit 2 ;;
  esac
done
[ -n "$vip" ] || { echo "render-haproxy: VIP=ADDRESS:PORT is required" >&2; exit 2; }
[ -n "$servers" ] || { echo "render-haproxy: at least one SERVER=NAME=ADDRESS:PORT is required" >&2; exit 2; }
text=$(<"$here/haproxy.cfg.template")
text=${text//"@VIP@"/"$vip"}
text=${text//"@SERVERS@"/"${servers%$'\n'}"}
printf '%s\n' "$text"
