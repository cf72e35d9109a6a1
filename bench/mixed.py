"""Mixed OpenAI requests at a fixed concurrency against one server.

Usage: python3 bench/mixed.py BASE_URL CONCURRENCY [REQUESTS]

The mix, in turn: a short streamed chat (max_tokens 32), a streamed chat
without max_tokens, a ~1,000-token prompt (max_tokens 8), a chat with n = 2
(max_tokens 16), and a 40-prompt completions array (max_tokens 4). Every
request streams, so the time to its first token is seen. Prints one JSON
object: requests, wall seconds, generated tokens per second over the run,
p50/p99 first-token time of the requests answered 200, and the count of
each status (a non-200 status without Retry-After is listed as such), and
per kind of request its statuses and tokens.
"""

import http.client
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

BASE, CONCURRENCY = sys.argv[1].rstrip("/").removesuffix("/v1"), int(sys.argv[2])
REQUESTS = int(sys.argv[3]) if len(sys.argv) > 3 else max(CONCURRENCY, 20)
HOST, PORT = BASE.split("//")[1].split(":")
PORT = int(PORT)
LONG = "The quick brown fox jumps over the lazy dog while the cat watches. " * 70


def model():
    conn = http.client.HTTPConnection(HOST, PORT, timeout=30)
    conn.request("GET", "/v1/models")
    return json.loads(conn.getresponse().read())["data"][0]["id"]


MODEL = model()


def chat(content, **extra):
    return "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": content}], "stream": True, **extra}


KINDS = ["short chat", "chat without max_tokens", "1,000-token prompt", "chat n=2", "40-prompt array"]
MIX = [
    lambda i: chat(f"Write one sentence about the number {i}.", max_tokens=32, temperature=0.7, seed=i),
    lambda i: chat("What is the capital of France? Answer in one word.", temperature=0),
    lambda i: ("/v1/completions", {"model": MODEL, "prompt": LONG + f" {i}", "max_tokens": 8, "stream": True}),
    lambda i: chat(f"Name a colour ({i}).", max_tokens=16, n=2, temperature=0.8, seed=i),
    lambda i: ("/v1/completions", {"model": MODEL, "prompt": [f"Once upon a time {i}, {k}" for k in range(40)], "max_tokens": 4, "stream": True}),
]


ERRORS = []


def one(i):
    path, body = MIX[i % len(MIX)](i)
    started = time.perf_counter()
    first, tokens, failed = None, 0, False
    try:
        conn = http.client.HTTPConnection(HOST, PORT, timeout=900)
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            retry = response.getheader("Retry-After")
            response.read()
            return f"{response.status}{'' if retry else ' without Retry-After'}", None, 0
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                failed = True
                ERRORS.append(str(event["error"].get("message", event["error"]))[:200])
            for choice in event.get("choices", []):
                piece = choice.get("text") or (choice.get("delta") or {}).get("content")
                if piece:
                    tokens += 1
                    if first is None:
                        first = time.perf_counter()
        conn.close()
        return "200 with an error event" if failed else "200", (first - started) if first else None, tokens
    except Exception as e:  # noqa: BLE001 - counted as its own status
        return f"error {type(e).__name__}", None, tokens


started = time.perf_counter()
with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
    results = list(pool.map(one, range(REQUESTS)))
wall = time.perf_counter() - started
statuses = {}
for status, _, _ in results:
    statuses[status] = statuses.get(status, 0) + 1
kinds = {}
for i, (status, _, tokens) in enumerate(results):
    kind = kinds.setdefault(KINDS[i % len(KINDS)], {"statuses": {}, "tokens": 0})
    kind["statuses"][status] = kind["statuses"].get(status, 0) + 1
    kind["tokens"] += tokens
firsts = sorted(f for s, f, _ in results if s == "200" and f is not None)
pct = lambda q: round(1e3 * firsts[min(len(firsts) - 1, int(q * len(firsts)))], 1) if firsts else None
print(json.dumps({
    "concurrency": CONCURRENCY,
    "requests": REQUESTS,
    "seconds": round(wall, 1),
    "tokens_per_s": round(sum(t for _, _, t in results) / wall, 1),
    "first_token_ms_p50": pct(0.5),
    "first_token_ms_p99": pct(0.99),
    "statuses": statuses,
    "error_events": sorted(set(ERRORS))[:5],
    "kinds": kinds,
}))
