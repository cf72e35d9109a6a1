#!/usr/bin/env bash
# Hotpot's engine against llama.cpp on this machine: the same model files,
# the same thread counts, prefill (pp512) and decode (tg128) tokens/s, peak
# RSS, and the machine's memory bandwidth measured in the same run, with
# decode expressed as a share of the bandwidth limit (weight bytes read per
# token / bandwidth).
#
# Decode runs one repetition at a time, the engines alternating (llama.cpp,
# hotpot, llama.cpp, ...), with a bandwidth read (that run's thread count)
# between every two runs; each run's share is against the mean of the two
# reads around it, and the table gives each engine's median share. On a
# shared host the read moves by half within a minute (this VM's two-thread
# read is 40-52 GB/s, with bursts of seconds at 68-83), so a read a minute away from a
# run says little about the machine during it, and a median over runs is
# not moved by one switch. The range of the reads is printed on each line.
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
        echo "$model, $t thread(s): prefill, llama-bench and hotpot bench" >&2
        /usr/bin/time -f '%M' -o "$OUT/$model.$t.pp.llama.rss" \
            "$LLAMA_BIN/llama-bench" -m "$path" -t "$t" -p 512 -n 0 -r "$REPS" -o json > "$OUT/$model.$t.pp.llama.json"
        /usr/bin/time -f '%M' -o "$OUT/$model.$t.pp.hotpot.rss" \
            "$HOTPOT" bench "$path" -t "$t" -p 512 -n 0 -r "$REPS" --json > "$OUT/$model.$t.pp.hotpot.json"
        echo "$model, $t thread(s): decode, $REPS alternating pairs with memory reads between" >&2
        read_bandwidth "$model.$t.0" "$t"
        for ((i = 0; i < REPS; i++)); do
            /usr/bin/time -f '%M' -o "$OUT/$model.$t.tg$i.llama.rss" \
                "$LLAMA_BIN/llama-bench" -m "$path" -t "$t" -p 0 -n 128 -r 1 -o json > "$OUT/$model.$t.tg$i.llama.json"
            read_bandwidth "$model.$t.$((2 * i + 1))" "$t"
            /usr/bin/time -f '%M' -o "$OUT/$model.$t.tg$i.hotpot.rss" \
                "$HOTPOT" bench "$path" -t "$t" -p 0 -n 128 -r 1 --json > "$OUT/$model.$t.tg$i.hotpot.json"
            read_bandwidth "$model.$t.$((2 * i + 2))" "$t"
        done
    done
done

python3 - "$OUT" "$MODELS" "$THREADS" "$REPS" <<'EOF'
import json, sys, datetime, os, glob, statistics
out, models, threads, reps = sys.argv[1], sys.argv[2].split(","), [int(t) for t in sys.argv[3].split(",")], int(sys.argv[4])
load = lambda name: json.load(open(f"{out}/{name}.json"))
read = lambda name: load(f"{name}.read")[0]["read_bytes_per_second"]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "")
isa = "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX2" if "avx2" in flags else "scalar"
peak_rss = lambda model, tool: max(int(open(f).read().split()[-1]) / 1024 for f in glob.glob(f"{out}/{model}.*.{tool}.rss"))
spread = lambda xs: f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.2f}"
print(f"Hotpot vs llama.cpp, {datetime.date.today()}, CPU: {cpu} ({os.cpu_count()} vCPUs, {isa})")
print(f"decode: {reps} single runs per engine, alternating, a memory read between every two runs; decode share = "
      "tokens/s x weight bytes per token / the mean of the two reads around that run, median over the engine's runs")
print()
print("| model | test | threads | llama.cpp t/s | hotpot t/s | hotpot / llama.cpp | decode share of bandwidth limit (llama.cpp / hotpot) | reads GB/s |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
reads_all = []
runs_detail = []
for model in models:
    for t in threads:
        llama, hotpot = load(f"{model}.{t}.pp.llama")[0], load(f"{model}.{t}.pp.hotpot")[0]
        print(f"| {model} | pp512 | {t} | {llama['avg_ts']:.2f} ± {llama['stddev_ts']:.2f} | "
              f"{hotpot['tokens_per_second']:.2f} ± {hotpot['stddev']:.2f} | {hotpot['tokens_per_second'] / llama['avg_ts']:.2f}x |  |  |")
        reads = [read(f"{model}.{t}.{i}") for i in range(2 * reps + 1)]
        reads_all += [(t, r) for r in reads]
        llama = [load(f"{model}.{t}.tg{i}.llama")[0]["avg_ts"] for i in range(reps)]
        runs = [load(f"{model}.{t}.tg{i}.hotpot")[0] for i in range(reps)]
        hotpot = [r["tokens_per_second"] for r in runs]
        bytes_per_token = runs[0]["weight_bytes_per_token"]
        llama_share = statistics.median(llama[i] * bytes_per_token / ((reads[2 * i] + reads[2 * i + 1]) / 2) for i in range(reps))
        hotpot_share = statistics.median(hotpot[i] * bytes_per_token / ((reads[2 * i + 1] + reads[2 * i + 2]) / 2) for i in range(reps))
        runs_detail.append(f"{model}, {t} thread(s): " + ", ".join(
            f"[{reads[2 * i] / 1e9:.1f}] llama.cpp {llama[i]:.1f} [{reads[2 * i + 1] / 1e9:.1f}] hotpot {hotpot[i]:.1f}" for i in range(reps))
            + f" [{reads[-1] / 1e9:.1f}]")
        print(f"| {model} | tg128 | {t} | {spread(llama)} | {spread(hotpot)} | {statistics.mean(hotpot) / statistics.mean(llama):.2f}x | "
              f"{100 * llama_share:.0f} % / {100 * hotpot_share:.0f} % | {min(reads) / 1e9:.1f}-{max(reads) / 1e9:.1f} |")
print()
print("decode runs in order, tokens/s, with the reads [GB/s] between them:")
for line in runs_detail:
    print(line)
print()
for t in threads:
    values = sorted(r for rt, r in reads_all if rt == t)
    print(f"memory read, {t} thread(s): {values[0] / 1e9:.1f}-{values[-1] / 1e9:.1f} GB/s over the run "
          f"(median {statistics.median(values) / 1e9:.1f}, {len(values)} reads)")
print()
print("| model | llama.cpp peak RSS | hotpot peak RSS | hotpot / llama.cpp |")
print("| --- | ---: | ---: | ---: |")
for model in models:
    l, h = peak_rss(model, "llama"), peak_rss(model, "hotpot")
    print(f"| {model} | {l:.0f} MiB | {h:.0f} MiB | {h / l:.2f} |")
print()
print(f"llama.cpp {load(f'{models[0]}.{threads[0]}.pp.llama')[0].get('build_commit', '?')} (llama-cpp-python sdist); "
      f"hotpot kernels: {load(f'{models[0]}.{threads[0]}.pp.hotpot')[0]['kernels']}")
EOF
