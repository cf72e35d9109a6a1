#!/usr/bin/env bash
# Batch throughput (issue 14): N chat requests of up to 128 tokens each as
# one batch through the Batch API on `hotpot up --nodes 3`, against the
# same N sent to llama.cpp's llama-server with 8 parallel slots, 8 at a
# time, on the same machine, model and thread count: wall time, generated
# tokens/s, and an interactive chat's time to first token (median of 8)
# idle and while the work runs. Target: hotpot >= 1.5x llama-server's
# tokens/s; interactive first token while the batch runs <= 2x idle.
#
#   bash bench/batch.sh [N=1000] [THREADS=2] [PARALLEL="16 24"]
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-1000}"; THREADS="${2:-2}"; PARALLEL="${3:-16 24}"
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
    python3 -c "
import json, sys
r = json.loads(sys.argv[1])
ratio = r['first_token_busy_ms'] / r['first_token_idle_ms']
print(f'| {sys.argv[2]} | {r[\"requests\"]} | {r[\"wall_s\"]} | {r[\"generated\"]} | {r[\"tokens_per_s\"]} | {r[\"first_token_idle_ms\"]} | {r[\"first_token_busy_ms\"]} ({ratio:.1f}x) |')" "$1" "$2"
}

echo "Batch of $N chats (128 tokens each, temperature 0), $THREADS threads in all ($(date -u +%F), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) vCPUs), model smollm2-135m"
echo
echo "| server | requests | wall (s) | generated tokens | tokens/s | interactive first token idle (ms) | while busy (ms) |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"

"$LLAMA_BIN/llama-server" -m "$MODEL" -t "$THREADS" --host 127.0.0.1 --port 8795 -np 8 -c 16384 >"$WORK/llama.log" 2>&1 &
SERVER=$!
wait_for http://127.0.0.1:8795/v1
row "$(python3 bench/batch.py direct http://127.0.0.1:8795/v1 smollm2-135m "$N" 128)" "llama-server (8 slots, 8 clients)"
stop

for p in $PARALLEL; do
    rm -rf "$WORK/data"
    HOTPOT_HOME="$WORK/home" "$HOTPOT" pull "$MODEL" >/dev/null
    HOTPOT_HOME="$WORK/home" "$HOTPOT" up --model "$MODEL" --nodes 3 --port 8796 -t "$THREADS" --no-audits --batch-parallel "$p" --data-dir "$WORK/data" >"$WORK/up.log" 2>&1 &
    SERVER=$!
    wait_for http://127.0.0.1:8796/v1
    row "$(python3 bench/batch.py batch http://127.0.0.1:8796/v1 auto "$N" 128)" "hotpot up --nodes 3, Batch API (--batch-parallel $p)"
    stop
done
