#!/usr/bin/env bash
# Decode speed through a 3-node chain with a one-way delay on every link,
# with and without speculative decoding, against the same model decoding
# in one local process. Not a test: a benchmark, printed as a table.
#
#   bash bench/wan.sh [TOKENS=48] [DELAYS="0 10 25 50"] [MODELS="qwen smollm"]
#
# The delay is emulated by every process (`--emulate-delay-ms`: each
# message a process sends to a peer waits that long first, so a chain pays
# it on every hop, as on a WAN); this machine's kernel has no `tc netem`
# (bench/netem.sh uses it where it exists). Modes:
#   star       the gateway relays every hop (2 legs per stage per pass:
#              `--no-push`)
#   push       each node pushes its output to the next (stages + 1 legs)
#   star+spec, push+spec
#              the same, with drafts checked k+1 positions per pass
#              (Qwen2.5-Coder-1.5B: the 0.5B drafts at the gateway, the
#              next window drafted while one is checked; SmolLM2-135M:
#              n-gram prompt lookup)
# MODES="star push star+spec push+spec" picks the modes.
set -euo pipefail
cd "$(dirname "$0")/.."
TOKENS="${1:-48}"
DELAYS="${2:-0 10 25 50}"
MODELS="${3:-qwen smollm}"
MODES="${MODES:-star push star+spec push+spec}"
cargo build --release -p hotpot-cli >&2
HOTPOT="$PWD/target/release/hotpot"
WORK="$(mktemp -d)"
source bench/lib.sh
trap 'stop_nodes; rm -rf "$WORK"' EXIT

CPU="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "hotpot over emulated WAN delay, 3 nodes (1 thread each) + the client, $TOKENS tokens, greedy ($(date -u +%F), $CPU, $(nproc) vCPUs)"
echo
echo "| model | draft | mode | one-way delay | first token (ms) | decode tok/s | vs local | drafted | accepted | tokens/pass |"
echo "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"

bench_model() {
    local model=$1 draft=$2 chain=$3; shift 3
    local args=("$@")
    "$HOTPOT" pull "$model" >/dev/null 2>&1
    [ "$draft" != ngram ] && "$HOTPOT" pull "$draft" >/dev/null 2>&1
    # The same model decoding in one process on this machine (2 threads).
    "$HOTPOT" run "$model" "${args[@]}" -n "$TOKENS" -t 2 >/dev/null 2>"$WORK/local.log"
    local local_rate; local_rate=$(decode_rate "$WORK/local.log")
    echo "| $model | – | local, 1 process | – | $(first_token_ms "$WORK/local.log") | $local_rate | 1.00 | | | |"
    for ms in $DELAYS; do
        NODE_MODEL=$model
        NODE_ARGS=(--emulate-delay-ms "$ms")
        BOOT=""
        for span in $chain; do
            start_node "$span" 1 "$BOOT"
            [ -z "$BOOT" ] && BOOT=$NODE_ADDR
        done
        for mode in $MODES; do
            spec=()
            [[ "$mode" == *+spec ]] && spec=(--draft "$draft")
            [[ "$mode" == star* ]] && spec+=(--no-push)
            "$HOTPOT" run "$model" "${args[@]}" -n "$TOKENS" -t 1 --join "$BOOT" --emulate-delay-ms "$ms" "${spec[@]}" \
                >/dev/null 2>"$WORK/run.log" || { cat "$WORK/run.log" >&2; exit 1; }
            rate=$(decode_rate "$WORK/run.log")
            ratio=$(awk -v a="$rate" -v b="$local_rate" 'BEGIN { printf "%.2f", a / b }')
            drafted=""; accepted=""; per_pass=""
            if grep -q '^\[speculation:' "$WORK/run.log"; then
                read -r drafted accepted per_pass < <(grep -m1 '^\[speculation:' "$WORK/run.log" \
                    | sed -E 's/.*: ([0-9]+) drafted, ([0-9]+) accepted.* ([0-9.]+) tokens per pass.*/\1 \2 \3/')
            fi
            used_draft=–; [[ "$mode" == *+spec ]] && used_draft=$draft
            echo "| $model | $used_draft | $mode | $ms ms | $(first_token_ms "$WORK/run.log") | $rate | $ratio | $drafted | $accepted | $per_pass |"
        done
        stop_nodes
    done
}

[[ " $MODELS " == *" qwen "* ]] && bench_model qwen2.5-coder-1.5b qwen2.5-coder-0.5b "0..9 9..18 18..28" \
    "Write a Python function that checks whether a string is a palindrome, with a docstring and three doctests." --chat --temperature 0
[[ " $MODELS " == *" smollm "* ]] && bench_model smollm2-135m ngram "0..10 10..20 20..30" \
    "def fib(n):
    if n < 2:
        return n
    return fib(n - 1) + fib(n - 2)

def fib2(n):
" --temperature 0
exit 0
