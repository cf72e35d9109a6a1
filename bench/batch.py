"""One side of bench/batch.sh: N chat requests of up to TOKENS tokens each,
either as one batch through hotpot's Batch API (`batch`) or sent straight
to a server's /v1/chat/completions, 8 at a time (`direct`, what a
llama-server user does). Prints one JSON line: wall time, generated tokens,
tokens/s, and interactive time to first token (median of 8 probes) when
idle and while the work runs.

  python3 bench/batch.py batch|direct BASE_URL MODEL|auto N TOKENS
"""

import concurrent.futures
import json
import os
import statistics
import sys
import tempfile
import threading
import time

from openai import OpenAI

mode, base_url, model, n, tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
api = OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=3600)
if model == "auto":
    model = api.models.list().data[0].id
TOPICS = ["the sea", "a cat", "bread", "rain", "a train", "music", "snow", "a garden", "coffee", "the moon"]


def body(i):
    return {"model": model, "messages": [{"role": "user", "content": f"Tell me a long story about {TOPICS[i % 10]} and the number {i}."}],
            "max_tokens": tokens, "temperature": 0}


def first_token_s():
    started = time.time()
    stream = api.chat.completions.create(model=model, messages=[{"role": "user", "content": "Name a color."}], max_tokens=8, temperature=0, stream=True)
    first = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.time() - started
    return first


def probes():
    return statistics.median(first_token_s() for _ in range(8))


idle = probes()
started = time.time()
if mode == "batch":
    path = os.path.join(tempfile.mkdtemp(), "input.jsonl")
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body(i)}) + "\n")
    batch = api.batches.create(input_file_id=api.files.create(file=open(path, "rb"), purpose="batch").id,
                               endpoint="/v1/chat/completions", completion_window="24h")
    while api.batches.retrieve(batch.id).request_counts.completed < 2:
        time.sleep(0.5)
    busy = probes()
    while (b := api.batches.retrieve(batch.id)).status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(1)
    wall = time.time() - started
    lines = [json.loads(l) for l in api.files.content(b.output_file_id).text.splitlines()] if b.output_file_id else []
    generated = sum(l["response"]["body"]["usage"]["completion_tokens"] for l in lines)
    answered = len(lines)
else:
    results = []
    def one(i):
        r = api.chat.completions.create(**body(i))
        return r.usage.completion_tokens
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(n)]
        time.sleep(3)
        busy = probes()
        generated = sum(f.result() for f in futures)
    wall = time.time() - started
    answered = n
print(json.dumps({"mode": mode, "requests": answered, "wall_s": round(wall, 1), "generated": generated, "tokens_per_s": round(generated / wall, 1),
                  "first_token_idle_ms": round(idle * 1000), "first_token_busy_ms": round(busy * 1000)}))
