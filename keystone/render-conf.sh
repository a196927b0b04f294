#!/usr/bin/env bash
# Renders keystone/keystone.conf.template to standard output.
# Usage: keystone/render-conf.sh NAME=VALUE... > /etc/keystone/keystone.conf
# Required: DATABASE_CONNECTION. Defaults (see the template for the arithmetic):
#   KEY_REPOSITORY=/etc/keystone/fernetd/tokens  CREDENTIAL_KEY_REPOSITORY=/etc/keystone/credential-keys
#   TOKEN_EXPIRATION=3600  ALLOW_EXPIRED_WINDOW=172800  MAX_ACTIVE_KEYS=5 (daily rotation)
#   TOKEN_CACHE_TIME=300  REVOKE_CACHE_TIME=300  CACHE_ENABLED=true
#   MEMCACHE_SERVERS=127.0.0.1:11211  DB_CONNECTION_RECYCLE_TIME=600
# With --template FILE (a file of this bundle, e.g. keystone-authtoken.conf.template)
# it renders that template instead; every @NAME@ in it needs a value.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
template=$here/keystone.conf.template
if [ "${1:-}" = --template ]; then
  [ $# -ge 2 ] || { echo "render-conf: --template needs a file name" >&2; exit 2; }
  template=$here/$(basename "$2")
  [ -r "$template" ] || { echo "render-conf: no template $2 in $here" >&2; exit 2; }
  shift 2
fi
declare -A v=(
  [KEY_REPOSITORY]=/etc/keystone/fernetd/tokens
  [CREDENTIAL_KEY_REPOSITORY]=/etc/keystone/credential-keys
  [TOKEN_EXPIRATION]=3600
  [ALLOW_EXPIRED_WINDOW]=172800
  [MAX_ACTIVE_KEYS]=5
  [TOKEN_CACHE_TIME]=300
  [REVOKE_CACHE_TIME]=300
  [DB_CONNECTION_RECYCLE_TIME]=600
  [CACHE_ENABLED]=true
  [MEMCACHE_SERVERS]=127.0.0.1:11211
)
for arg in "$@"; do
  case $arg in
    *=*) name=${arg%%=*} ;;
    *) echo "render-conf: expected NAME=VALUE, got '$arg'" >&2; exit 2 ;;
  esac
  grep -q "@$name@" "$template" ||
    { echo "render-conf: the template has no @$name@" >&2; exit 2; }
  [[ ${arg#*=} != *$'\n'* ]] || { echo "render-conf: $name must be one line" >&2; exit 2; }
  v[$name]=${arg#*=}
done
text=$(<"$template")
for name in "${!v[@]}"; do
  # Quoted replacement: no '&' or '\' expansion, so passwords in URLs survive.
  text=${text//"@$name@"/"${v[$name]}"}
done
if left=$(grep -o '@[A-Z_]*@' <<<"$text" | sort -u | tr '\n' ' ') && [ -n "$left" ]; then
  echo "render-conf: no value for $left" >&2
  exit 2
fi
printf '%s\n' "$text"
