#!/bin/sh
# Runs every cargo-fuzz target for SECONDS each (default 60) on the nightly
# toolchain; exits non-zero on the first crash, leaving the input under
# fuzz/artifacts/<target>/. A crash found becomes a regression test (a unit test
# beside the code, with the input) before it is fixed.
#   scripts/fuzz.sh [SECONDS]
set -eu
seconds="${1:-60}"
cd "$(dirname "$0")/.."
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
targets="token_decode install_request rotator_config agent_config keystone_conf"
cargo +nightly fuzz build
for target in $targets; do
    mkdir -p "fuzz/corpus/$target"
    echo "fuzz: $target for ${seconds}s"
    cargo +nightly fuzz run "$target" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
done
echo "fuzz: no crash in $targets (${seconds}s each)"
