#!/usr/bin/env bash
# Hotpot's engine against llama.cpp on this machine: same model file, same
# thread counts, prefill (pp512) and decode (tg128) tokens/s, and peak RSS.
#
#   bash bench/vs-llamacpp.sh [THREADS=1,2] [REPETITIONS=5]
#
# llama.cpp is built from PyPI's llama-cpp-python sdist (bench/llamacpp.sh);
# the model comes from `hotpot pull smollm2-135m`.
set -euo pipefail
cd "$(dirname "$0")/.."

THREADS="${1:-1,2}"
REPS="${2:-5}"

cargo build --release -p hotpot-cli >&2
HOTPOT=./target/release/hotpot
MODEL="$($HOTPOT pull smollm2-135m 2>/dev/null | cut -f3)"
LLAMA_BIN="$(bash bench/llamacpp.sh)"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

echo "running llama-bench (threads $THREADS, $REPS repetitions)" >&2
/usr/bin/time -f '%M' -o "$OUT/llama.rss" \
    "$LLAMA_BIN/llama-bench" -m "$MODEL" -t "$THREADS" -p 512 -n 128 -r "$REPS" -o json > "$OUT/llama.json"
echo "running hotpot bench (threads $THREADS, $REPS repetitions)" >&2
/usr/bin/time -f '%M' -o "$OUT/hotpot.rss" \
    "$HOTPOT" bench "$MODEL" -t "$THREADS" -p 512 -n 128 -r "$REPS" --json > "$OUT/hotpot.json"

python3 - "$OUT" <<'EOF'
import json, sys, datetime, platform, os
out = sys.argv[1]
llama = json.load(open(f"{out}/llama.json"))
hotpot = json.load(open(f"{out}/hotpot.json"))
rss = {name: int(open(f"{out}/{name}.rss").read().split()[-1]) / 1024 for name in ("llama", "hotpot")}
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
print(f"Hotpot vs llama.cpp, {datetime.date.today()}, CPU: {cpu} ({os.cpu_count()} vCPUs)")
print(f"llama.cpp {llama[0].get('build_commit', '?')} (llama-cpp-python sdist), hotpot kernels: {hotpot[0]['kernels']}")
print()
print("| test | threads | llama.cpp t/s | hotpot t/s | hotpot / llama.cpp |")
print("| --- | ---: | ---: | ---: | ---: |")
for h in hotpot:
    test = h["test"]
    n_prompt, n_gen = (int(test[2:]), 0) if test.startswith("pp") else (0, int(test[2:]))
    l = next(r for r in llama if r["n_threads"] == h["threads"] and r["n_prompt"] == n_prompt and r["n_gen"] == n_gen)
    print(f"| {test} | {h['threads']} | {l['avg_ts']:.2f} ± {l['stddev_ts']:.2f} | "
          f"{h['tokens_per_second']:.2f} ± {h['stddev']:.2f} | {h['tokens_per_second'] / l['avg_ts']:.2f}x |")
print()
print(f"peak RSS: llama.cpp {rss['llama']:.1f} MiB, hotpot {rss['hotpot']:.1f} MiB "
      f"(hotpot / llama.cpp = {rss['hotpot'] / rss['llama']:.2f})")
EOF
