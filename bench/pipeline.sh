#!/usr/bin/env bash
# Decode speed of a 3-node pipeline on loopback against one process, same
# model, same threads per process (target: pipeline ≥ 90 % of one process).
#
#   bash bench/pipeline.sh [THREADS=1] [TOKENS=256] [RUNS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${1:-1}"; TOKENS="${2:-256}"; RUNS="${3:-3}"
cargo build --release -p hotpot-cli >&2
HOTPOT="$PWD/target/release/hotpot"
WORK="$(mktemp -d)"
source bench/lib.sh
trap 'stop_nodes; rm -rf "$WORK"' EXIT
"$HOTPOT" pull smollm2-135m >/dev/null 2>&1

PROMPT="Once upon a time, in a small village at the edge of a great forest"
local_rates=(); swarm_rates=()
for _ in $(seq 1 "$RUNS"); do
    "$HOTPOT" run smollm2-135m "$PROMPT" --temperature 0 -n "$TOKENS" -t "$THREADS" >/dev/null 2>"$WORK/local.log"
    local_rates+=("$(decode_rate "$WORK/local.log")")
done

start_node 0..10 "$THREADS"; BOOT=$NODE_ADDR
start_node 10..20 "$THREADS" "$BOOT"
start_node 20..30 "$THREADS" "$BOOT"
for _ in $(seq 1 "$RUNS"); do
    "$HOTPOT" run smollm2-135m "$PROMPT" --temperature 0 -n "$TOKENS" -t "$THREADS" --join "$BOOT" >/dev/null 2>"$WORK/swarm.log"
    swarm_rates+=("$(decode_rate "$WORK/swarm.log")")
done

L=$(median "${local_rates[@]}"); S=$(median "${swarm_rates[@]}")
echo "decode, $TOKENS tokens, $THREADS thread(s) per process, median of $RUNS runs ($(date -u +%F), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) vCPUs)"
echo "| setup | decode tok/s |"
echo "| --- | ---: |"
echo "| one process (hotpot run) | $L |"
echo "| 3 nodes on loopback [0,10) [10,20) [20,30) + client | $S |"
awk -v l="$L" -v s="$S" 'BEGIN {printf "pipeline / one process = %.1f %%\n", 100 * s / l}'
