#!/usr/bin/env bash
# Mixed OpenAI requests (short chats, chats without max_tokens, ~1,000-token
# prompts, n = 2, 40-prompt completion arrays; all streamed) at concurrency
# 1, 8, 32, 128 and 256 against `hotpot up --nodes 3` and llama.cpp's
# llama-server (8 slots) on the same machine, model and thread count:
# generated tokens/s, p50/p99 time to first token, and each status's count.
# Target (issue 17): no status other than 200, or 429/503 with Retry-After,
# at any concurrency; throughput at 256 within 10 % of the peak.
#
#   bash bench/load.sh [THREADS=2] [LEVELS="1 8 32 128 256"]
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${1:-2}"; LEVELS="${2:-1 8 32 128 256}"
cargo build --release -p hotpot-cli >&2
HOTPOT="$PWD/target/release/hotpot"
MODEL="$("$HOTPOT" pull smollm2-135m 2>/dev/null | cut -f3)"
LLAMA_BIN="$(bash bench/llamacpp.sh)"
WORK="$(mktemp -d)"
SERVER=""
source bench/lib.sh
trap 'stop; rm -rf "$WORK"' EXIT
ulimit -n "$(ulimit -Hn)"

rows() {
    local name=$1 url=$2
    for c in $LEVELS; do
        local r
        r=$(python3 bench/mixed.py "$url" "$c")
        python3 -c "
import json, sys
r = json.loads(sys.argv[1])
s = ', '.join(f'{k}: {v}' for k, v in sorted(r['statuses'].items()))
print(f'| {sys.argv[2]} | {r[\"concurrency\"]} | {r[\"requests\"]} | {r[\"tokens_per_s\"]} | {r[\"first_token_ms_p50\"]} | {r[\"first_token_ms_p99\"]} | {s} |')" "$r" "$name"
    done
}

echo "Mixed load, $THREADS threads in all ($(date -u +%F), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) vCPUs), model smollm2-135m"
echo
echo "| server | concurrency | requests | generated tok/s | first token p50 (ms) | first token p99 (ms) | statuses |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | --- |"

"$LLAMA_BIN/llama-server" -m "$MODEL" -t "$THREADS" --host 127.0.0.1 --port 8793 -np 8 -c 65536 >"$WORK/llama.log" 2>&1 &
SERVER=$!
wait_for http://127.0.0.1:8793/v1
rows "llama-server (8 slots)" http://127.0.0.1:8793/v1
stop

HOTPOT_HOME="$WORK/home" "$HOTPOT" pull "$MODEL" >/dev/null
HOTPOT_HOME="$WORK/home" "$HOTPOT" up --model "$MODEL" --nodes 3 --port 8794 -t "$THREADS" --no-audits >"$WORK/up.log" 2>&1 &
SERVER=$!
wait_for http://127.0.0.1:8794/v1
rows "hotpot up --nodes 3" http://127.0.0.1:8794/v1
echo
echo "hotpot: $(curl -s http://127.0.0.1:8794/metrics | grep -E '^hotpot_(bans|node_busy|failovers)_total' | tr '\n' ' ')"
stop
