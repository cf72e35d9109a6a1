"""Streams chat completions from an OpenAI-compatible server and measures
time to first token and decode speed.

Usage: python3 bench/load.py BASE_URL CONCURRENCY [MAX_TOKENS=128] [ROUNDS=2]

Prints one JSON object: median time to first token (ms), median per-stream
decode tokens/s (chunks after the first, over the time after the first),
and aggregate tokens/s over all streams.
"""

import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI

base_url, concurrency = sys.argv[1], int(sys.argv[2])
max_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 128
rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 2
api = OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
model = api.models.list().data[0].id


def one(i):
    messages = [{"role": "user", "content": f"Write a long story about a dragon named number {i}."}]
    started = time.perf_counter()
    first, count = None, 0
    stream = api.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0.7,
                                         seed=i, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            count += 1
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    decode = (count - 1) / (end - first) if first and count > 1 and end > first else 0.0
    return (first - started) * 1e3 if first else float("nan"), decode, count


ttfts, decodes, total_tokens = [], [], 0
wall = 0.0
for r in range(rounds):
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, range(r * concurrency, (r + 1) * concurrency)))
    wall += time.perf_counter() - started
    for ttft, decode, count in results:
        ttfts.append(ttft)
        decodes.append(decode)
        total_tokens += count
print(json.dumps({
    "concurrency": concurrency,
    "ttft_ms": round(statistics.median(ttfts), 1),
    "decode_tok_s_per_stream": round(statistics.median(decodes), 1),
    "aggregate_tok_s": round(total_tokens / wall, 1),
}))
