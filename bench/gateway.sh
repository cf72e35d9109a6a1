#!/usr/bin/env bash
# Time to first token and decode speed through the OpenAI API, for 1 and 8
# concurrent streams: `hotpot up --nodes 1`, `hotpot up --nodes 3`, and
# llama.cpp's llama-server (what a user would run instead) on the same
# machine, model and thread count.
#
#   bash bench/gateway.sh [THREADS=2] [MAX_TOKENS=128]
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${1:-2}"; MAX_TOKENS="${2:-128}"
cargo build --release -p hotpot-cli >&2
HOTPOT="$PWD/target/release/hotpot"
MODEL="$("$HOTPOT" pull smollm2-135m 2>/dev/null | cut -f3)"
LLAMA_BIN="$(bash bench/llamacpp.sh)"
python3 -m pip install -q openai >/dev/null 2>&1 || true
WORK="$(mktemp -d)"
SERVER=""
source bench/lib.sh
trap 'stop; rm -rf "$WORK"' EXIT

row() {
    local name=$1 url=$2
    for c in 1 8; do
        local r
        r=$(python3 bench/load.py "$url" "$c" "$MAX_TOKENS" 2)
        python3 -c "import json,sys; r=json.loads(sys.argv[1]); print(f'| {sys.argv[2]} | {r[\"concurrency\"]} | {r[\"ttft_ms\"]} | {r[\"decode_tok_s_per_stream\"]} | {r[\"aggregate_tok_s\"]} |')" "$r" "$name"
    done
}

echo "OpenAI API streaming, $MAX_TOKENS tokens per request, $THREADS threads in all ($(date -u +%F), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) vCPUs)"
echo
echo "| server | streams | first token (ms, median) | decode tok/s per stream (median) | aggregate tok/s |"
echo "| --- | ---: | ---: | ---: | ---: |"

"$LLAMA_BIN/llama-server" -m "$MODEL" -t "$THREADS" --host 127.0.0.1 --port 8791 -np 8 -c 16384 >"$WORK/llama.log" 2>&1 &
SERVER=$!
wait_for http://127.0.0.1:8791/v1
row "llama-server (-t $THREADS, 8 slots)" http://127.0.0.1:8791/v1
stop

for nodes in 1 3; do
    "$HOTPOT" up --nodes "$nodes" --port 8792 -t "$THREADS" >"$WORK/up.log" 2>&1 &
    SERVER=$!
    wait_for http://127.0.0.1:8792/v1
    row "hotpot up --nodes $nodes (-t $THREADS shared)" http://127.0.0.1:8792/v1
    stop
done
