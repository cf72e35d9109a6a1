#!/usr/bin/env bash
# Hotpot's engine against llama.cpp on this machine: the same model files,
# the same thread counts, prefill (pp512) and decode (tg128) tokens/s, peak
# RSS, and the machine's memory bandwidth measured in the same run, with
# decode expressed as a share of the bandwidth limit (weight bytes read per
# token / bandwidth).
#
# The read is measured right before and right after each engine's run, with
# that run's thread count, and each run's share is against the mean of the
# two reads around it: on a shared host the read moves by half within
# minutes, so one read at the start of a 10-minute script says little about
# the machine during a run at its end. Every read is printed.
#
#   bash bench/vs-llamacpp.sh [MODELS=all] [THREADS=1,2] [REPETITIONS=5]
#
# MODELS: catalogue names, comma-separated, or `all` (smollm2-135m,
# gemma3-270m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b). llama.cpp is built
# from PyPI's llama-cpp-python sdist (bench/llamacpp.sh); the models come
# from `hotpot pull`. The two engines run in turn (llama.cpp, hotpot, per
# model and thread count) so that a drifting machine affects both.
set -euo pipefail
cd "$(dirname "$0")/.."

MODELS="${1:-all}"
THREADS="${2:-1,2}"
REPS="${3:-5}"
[ "$MODELS" = all ] && MODELS="smollm2-135m,gemma3-270m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b"

cargo build --release -p hotpot-cli >&2
HOTPOT=./target/release/hotpot
LLAMA_BIN="$(bash bench/llamacpp.sh)"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

# read NAME THREADS: one bandwidth measurement, kept as $OUT/NAME.read.json.
read_bandwidth() {
    "$HOTPOT" bench --bandwidth -t "$2" --json > "$OUT/$1.read.json"
}

IFS=, read -r -a models <<< "$MODELS"
IFS=, read -r -a threads <<< "$THREADS"
for model in "${models[@]}"; do
    path="$($HOTPOT pull "$model" 2>/dev/null | cut -f3)"
    for t in "${threads[@]}"; do
        echo "$model, $t thread(s): memory read" >&2
        read_bandwidth "$model.$t.0" "$t"
        echo "$model, $t thread(s): llama-bench" >&2
        /usr/bin/time -f '%M' -o "$OUT/$model.$t.llama.rss" \
            "$LLAMA_BIN/llama-bench" -m "$path" -t "$t" -p 512 -n 128 -r "$REPS" -o json > "$OUT/$model.$t.llama.json"
        read_bandwidth "$model.$t.1" "$t"
        echo "$model, $t thread(s): hotpot bench" >&2
        /usr/bin/time -f '%M' -o "$OUT/$model.$t.hotpot.rss" \
            "$HOTPOT" bench "$path" -t "$t" -p 512 -n 128 -r "$REPS" --json > "$OUT/$model.$t.hotpot.json"
        read_bandwidth "$model.$t.2" "$t"
    done
done

python3 - "$OUT" "$MODELS" "$THREADS" <<'EOF'
import json, sys, datetime, os
out, models, threads = sys.argv[1], sys.argv[2].split(","), [int(t) for t in sys.argv[3].split(",")]
read = lambda name: json.load(open(f"{out}/{name}.read.json"))[0]["read_bytes_per_second"]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "")
isa = "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX2" if "avx2" in flags else "scalar"
rss = lambda name: int(open(f"{out}/{name}.rss").read().split()[-1]) / 1024
print(f"Hotpot vs llama.cpp, {datetime.date.today()}, CPU: {cpu} ({os.cpu_count()} vCPUs, {isa})")
print("decode share of the bandwidth limit: tokens/s x weight bytes per token / the mean of the memory reads "
      "just before and just after that engine's run (the reads: before llama.cpp / between / after hotpot)")
print()
print("| model | test | threads | llama.cpp t/s | hotpot t/s | hotpot / llama.cpp | decode share of bandwidth limit (llama.cpp / hotpot) | reads GB/s |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
reads_all = []
memory = []
for model in models:
    peak = {"llama": 0.0, "hotpot": 0.0}
    for t in threads:
        llama = json.load(open(f"{out}/{model}.{t}.llama.json"))
        hotpot = json.load(open(f"{out}/{model}.{t}.hotpot.json"))
        for tool in peak:
            peak[tool] = max(peak[tool], rss(f"{model}.{t}.{tool}"))
        r0, r1, r2 = (read(f"{model}.{t}.{i}") for i in range(3))
        reads_all += [(t, r0), (t, r1), (t, r2)]
        for h in hotpot:
            test = h["test"]
            n_prompt, n_gen = (int(test[2:]), 0) if test.startswith("pp") else (0, int(test[2:]))
            l = next(r for r in llama if r["n_threads"] == t and r["n_prompt"] == n_prompt and r["n_gen"] == n_gen)
            share, reads = "", ""
            if n_gen:
                bytes_per_token = h["weight_bytes_per_token"]
                llama_share = l["avg_ts"] * bytes_per_token / ((r0 + r1) / 2)
                hotpot_share = h["tokens_per_second"] * bytes_per_token / ((r1 + r2) / 2)
                share = f"{100 * llama_share:.0f} % / {100 * hotpot_share:.0f} %"
                reads = f"{r0 / 1e9:.1f} / {r1 / 1e9:.1f} / {r2 / 1e9:.1f}"
            print(f"| {model} | {test} | {t} | {l['avg_ts']:.2f} ± {l['stddev_ts']:.2f} | "
                  f"{h['tokens_per_second']:.2f} ± {h['stddev']:.2f} | {h['tokens_per_second'] / l['avg_ts']:.2f}x | {share} | {reads} |")
    memory.append((model, peak["llama"], peak["hotpot"]))
print()
for t in threads:
    values = sorted(r for rt, r in reads_all if rt == t)
    print(f"memory read, {t} thread(s): {values[0] / 1e9:.1f}-{values[-1] / 1e9:.1f} GB/s over the run "
          f"(median {values[len(values) // 2] / 1e9:.1f}, {len(values)} reads)")
print()
print("| model | llama.cpp peak RSS | hotpot peak RSS | hotpot / llama.cpp |")
print("| --- | ---: | ---: | ---: |")
for model, l, h in memory:
    print(f"| {model} | {l:.0f} MiB | {h:.0f} MiB | {h / l:.2f} |")
print()
print(f"llama.cpp {json.load(open(f'{out}/{models[0]}.{threads[0]}.llama.json'))[0].get('build_commit', '?')} (llama-cpp-python sdist); "
      f"hotpot kernels: {json.load(open(f'{out}/{models[0]}.{threads[0]}.hotpot.json'))[0]['kernels']}")
EOF
