#!/usr/bin/env bash
# One command for the side-by-side comparison of docs/scale.md: N real agent
# processes on this host (each its own repository on this machine's disk, fsync
# included) against a sequential `rsync -a --checksum --delete` over ssh to the
# same N regions, through an sshd on loopback that this script starts and stops.
# Prints a table, then the same figures as one JSON object on the last line.
#
#   scripts/compare-rsync.sh            # N=100, 20 rotations
#   N=100 ROTATIONS=20 FERNETD=target/release/fernetd scripts/compare-rsync.sh
#
# Needs root for apt-get when openssh-server or rsync is missing; the rsync/ssh
# side is reported as skipped only when they cannot be installed.
set -euo pipefail

N=${N:-100}
ROTATIONS=${ROTATIONS:-20}
FERNETD=${FERNETD:-}
if [[ -z "$FERNETD" ]]; then
    cargo build --release --quiet
    FERNETD=${CARGO_TARGET_DIR:-target}/release/fernetd
fi
FERNETD=$(realpath "$FERNETD")

WORK=$(mktemp -d /var/tmp/fernetd-compare.XXXXXX)
PIDS=()
SSHD_PID=
cleanup() {
    local status=$?
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    [[ -n "$SSHD_PID" ]] && kill "$SSHD_PID" 2>/dev/null || true
    wait 2>/dev/null || true
    # A failed run keeps its fleet and logs for a look.
    if [[ $status -eq 0 ]]; then
        rm -rf "$WORK"
    else
        echo "failed (exit $status); the fleet and its logs are kept in $WORK" >&2
    fi
}
trap cleanup EXIT
# `set -e` alone would end the run without a word.
trap 'echo "compare-rsync.sh: line $LINENO: \"$BASH_COMMAND\" failed" >&2' ERR

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
quantile() { # quantile Q (0..1) of the numbers on stdin, nearest rank
    sort -n | awk -v q="$1" '{v[NR]=$1} END {r=int(q*NR); if (r<q*NR) r++; if (r<1) r=1; print v[r]}'
}

# --- the rsync/ssh side's packages --------------------------------------------
RSYNC_STATUS=measured
if ! command -v rsync >/dev/null || ! [[ -x /usr/sbin/sshd ]] || ! command -v ssh >/dev/null; then
    echo "installing openssh-server, openssh-client and rsync with apt-get" >&2
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            openssh-server openssh-client rsync; } >&2; then
        echo "cannot install openssh-server/rsync: the rsync/ssh comparison is skipped" >&2
        RSYNC_STATUS=skipped
    fi
fi

# --- fernetd: N agents and the rotator, each its own process ------------------
"$FERNETD" demo --config-only --regions "$N" --dir "$WORK/fleet" >/dev/null
# The demo rotates every 5 s by itself; here only the measured rotations run, so
# that none is refused because a scheduled one is still being acknowledged.
sed -i 's|^cron = .*|cron = "0 0 1 1 *"|' "$WORK/fleet/rotator.toml"
mkdir -p "$WORK/logs"
start_ms=$(now_ms)
AGENT_PIDS=()
for config in "$WORK"/fleet/agents/*.toml; do
    FERNETD_LOG=warn "$FERNETD" agent --config "$config" >"$WORK/logs/$(basename "$config").log" 2>&1 &
    AGENT_PIDS+=($!)
    PIDS+=($!)
done
FERNETD_LOG=warn "$FERNETD" rotator --config "$WORK/fleet/rotator.toml" >"$WORK/logs/rotator.log" 2>&1 &
ROTATOR_PID=$!
PIDS+=($ROTATOR_PID)
admin() { "$FERNETD" admin --config "$WORK/fleet/admin.toml" "$@"; }
converged=no
for _ in $(seq 1 600); do
    if admin status >/dev/null 2>&1; then converged=yes; break; fi
    sleep 0.1
done
[[ $converged == yes ]] || { echo "the fleet did not converge in 60 s; logs in $WORK/logs" >&2; exit 3; }
cold_ms=$(( $(now_ms) - start_ms ))
alive=0
for p in "${AGENT_PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=$((alive + 1)); done
[[ $alive == "$N" ]] || { echo "only $alive of $N agents are running" >&2; exit 3; }

# Each rotation is timed from the admin command's start to its return with every
# acknowledgement (`--wait`): it includes that command's own start and handshake.
: >"$WORK/rotations"
cpu_before=$(cpu_ticks "$ROTATOR_PID")
failed=0
held=0
for _ in $(seq 1 "$ROTATIONS"); do
    # The key-lifetime rule holds a rotation until the key it would purge has no
    # valid token left (the demo's tokens last seconds): a held rotation commits
    # nothing, so it is retried at its purge-safe time and only the committed
    # attempt is timed.
    for _ in $(seq 1 120); do
        t=$(now_ms)
        if admin rotate --wait 30 >"$WORK/logs/last-rotate.log" 2>&1; then
            echo $(( $(now_ms) - t )) >>"$WORK/rotations"
            break
        fi
        if grep -q "held:" "$WORK/logs/last-rotate.log"; then
            held=$((held + 1))
            sleep 0.5
            continue
        fi
        failed=$((failed + 1))
        echo "rotation refused or failed:" >&2
        tail -5 "$WORK/logs/last-rotate.log" >&2
        break
    done
    cat "$WORK/logs/last-rotate.log" >>"$WORK/logs/rotate.log"
done
echo "rotations held by the key-lifetime rule and retried: $held" >&2
cpu_after=$(cpu_ticks "$ROTATOR_PID")
done_rotations=$(wc -l <"$WORK/rotations")
[[ $done_rotations -gt 0 ]] || { echo "no rotation succeeded" >&2; exit 3; }
p50=$(quantile 0.5 <"$WORK/rotations")
p99=$(quantile 0.99 <"$WORK/rotations")
# Kernel CPU ticks are 10 ms: µs per agent per rotation over all rotations.
cpu_us=$(awk -v t=$((cpu_after - cpu_before)) -v r="$done_rotations" -v n="$N" 'BEGIN {printf "%.1f", t*10000/r/n}')
rotator_rss=$(rss_kib "$ROTATOR_PID")
agent_rss=$(for p in "${AGENT_PIDS[@]}"; do rss_kib "$p"; done | quantile 0.5)
agent_rss_max=$(for p in "${AGENT_PIDS[@]}"; do rss_kib "$p"; done | quantile 1)
# The repository the agents now hold, for rsync to push.
# (A glob, not `ls | head -1`: under pipefail, ls killed by SIGPIPE once head
# has its line ended a run here without a word.)
regions=("$WORK"/fleet/regions/*/fernet-keys)
src=${regions[0]}

# --- rsync over ssh, sequentially, to the same N regions ----------------------
rsync_ms=null
ratio=null
if [[ $RSYNC_STATUS == measured ]]; then
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    ssh-keygen -q -t ed25519 -N '' -f "$WORK/host_key"
    ssh-keygen -q -t ed25519 -N '' -f "$WORK/client_key"
    mkdir -p "$WORK/ssh" && cp "$WORK/client_key.pub" "$WORK/ssh/authorized_keys"
    chmod 700 "$WORK/ssh" && chmod 600 "$WORK/ssh/authorized_keys"
    cat >"$WORK/sshd_config" <<EOF
ListenAddress 127.0.0.1
Port $port
HostKey $WORK/host_key
AuthorizedKeysFile $WORK/ssh/authorized_keys
PidFile $WORK/sshd.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
EOF
    mkdir -p /run/sshd
    /usr/sbin/sshd -D -e -f "$WORK/sshd_config" 2>"$WORK/logs/sshd.log" &
    SSHD_PID=$!
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done
    SSH="ssh -p $port -i $WORK/client_key -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
    mkdir -p "$WORK/rsync-regions"
    t=$(now_ms)
    for i in $(seq 1 "$N"); do
        rsync -a --checksum --delete -e "$SSH" "$src/" "$(id -un)@127.0.0.1:$WORK/rsync-regions/$i/"
    done
    rsync_ms=$(( $(now_ms) - t ))
    ratio=$(awk -v a="$rsync_ms" -v b="$p99" 'BEGIN {printf "%.1f", a/b}')
fi

printf '%-28s %s\n' \
    "N (agent processes)" "$N" \
    "cold start" "$cold_ms ms" \
    "rotations" "$done_rotations ok, $failed failed" \
    "rotation p50 / p99" "$p50 ms / $p99 ms" \
    "rotator CPU per agent" "$cpu_us µs per rotation" \
    "rotator RSS" "$rotator_rss KiB" \
    "agent RSS median / max" "$agent_rss KiB / $agent_rss_max KiB" \
    "rsync over ssh, sequential" "$( [[ $rsync_ms == null ]] && echo skipped || echo "$rsync_ms ms")" \
    "ratio rsync / fernetd p99" "$( [[ $ratio == null ]] && echo skipped || echo "$ratio x")"
printf '{"n":%s,"cold_start_ms":%s,"rotations":%s,"failed_rotations":%s,"rotation_p50_ms":%s,"rotation_p99_ms":%s,"rotator_cpu_us_per_agent":%s,"rotator_rss_kib":%s,"agent_rss_median_kib":%s,"agent_rss_max_kib":%s,"rsync":"%s","rsync_ssh_ms":%s,"ratio":%s}\n' \
    "$N" "$cold_ms" "$done_rotations" "$failed" "$p50" "$p99" "$cpu_us" "$rotator_rss" "$agent_rss" "$agent_rss_max" "$RSYNC_STATUS" "$rsync_ms" "$ratio"
