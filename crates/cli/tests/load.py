"""Load and abuse against a real gateway; prints one JSON line of findings.

Usage: python3 load.py MODE BASE_URL [PID]

  burst  200 concurrent mixed requests (short chats, ~3,000-token prompts,
         chats without max_tokens, n > 1, a 40-prompt completions array):
         the status of each and whether non-200 answers carry Retry-After.
  gap    a stream's longest gap between tokens while a ~3,000-token
         prompt is prefilled.
  huge   a stream's longest gap while four 4 MB prompts arrive, and the
         gateway's RSS (process PID) before and after.
  conns  10,000 idle or slow connections: how long /health and a chat
         take meanwhile, and whether slow headers and bodies are closed.

The test that runs this script (tests/load.rs) makes the assertions.
"""

import http.client
import json
import resource
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

MODE, BASE = sys.argv[1], sys.argv[2].rstrip("/").removesuffix("/v1")
HOST, PORT = BASE.split("//")[1].split("/")[0].split(":")
PORT = int(PORT)
MODEL = "smollm2-135m"
LONG = "The quick brown fox jumps over the lazy dog while the cat watches. " * 210


def post(path, body, timeout=600):
    request = urllib.request.Request(BASE + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, None, json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            body = json.loads(body)
        except ValueError:
            body = body.decode("utf-8", "replace")
        return e.code, e.headers.get("Retry-After"), body
    except Exception as e:  # noqa: BLE001 - reported, and the test fails on it
        return repr(e), None, None


def chat(content, **extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0, **extra}


def stream_gaps(stop_after=None):
    """Streams a long greedy completion; returns (gaps, tokens, start, end)."""
    conn = http.client.HTTPConnection(HOST, PORT, timeout=120)
    # The end tokens (<|endoftext|> 0, <|im_end|> 2) are banned, so the
    # stream runs its whole length however fast the machine is.
    body = {"model": MODEL, "prompt": "Count from one to one hundred: one, two, three,", "max_tokens": 1000, "temperature": 0, "stream": True,
            "logit_bias": {"0": -100, "2": -100}}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200, response.status
    times = []
    for line in response:
        if line.startswith(b"data: {"):
            times.append(time.monotonic())
    conn.close()
    gaps = [b - a for a, b in zip(times, times[1:])]
    return gaps, len(times), times[0], times[-1]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def burst():
    kinds = [
        lambda: post("/v1/chat/completions", chat("Hi!", max_tokens=8)),
        lambda: post("/v1/chat/completions", chat("What is the capital of France?")),
        lambda: post("/v1/chat/completions", chat("Name a colour.", max_tokens=6, n=3, temperature=0.8)),
        lambda: post("/v1/completions", {"model": MODEL, "prompt": ["Once upon a time"] * 40, "max_tokens": 4}),
        lambda: post("/v1/chat/completions", chat("Say yes.", max_tokens=4)),
    ]
    jobs = [kinds[i % len(kinds)] for i in range(190)] + [lambda: post("/v1/completions", {"model": MODEL, "prompt": LONG, "max_tokens": 2})] * 10
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        answers = list(pool.map(lambda job: job(), jobs))
    statuses = {}
    for status, retry_after, _ in answers:
        key = str(status) if status in (200,) else f"{status}{'+retry-after' if retry_after else ''}"
        statuses[key] = statuses.get(key, 0) + 1
    odd = [(s, b) for s, r, b in answers if s != 200 and not (s in (429, 503) and r)]
    after = post("/v1/chat/completions", chat("What is the capital of France?", max_tokens=8))
    print(json.dumps({
        "statuses": statuses,
        "odd": [str(o)[:300] for o in odd[:5]],
        "seconds": round(time.monotonic() - started, 1),
        "after_status": after[0],
        "after_text": after[2]["choices"][0]["message"]["content"] if after[0] == 200 else str(after[2])[:300],
    }))


def gap():
    result = {}

    def long_prompt():
        time.sleep(1.0)
        t0 = time.monotonic()
        status, _, body = post("/v1/completions", {"model": MODEL, "prompt": LONG, "max_tokens": 1})
        result.update(long_status=status, long_start=t0, long_end=time.monotonic(),
                      long_tokens=body["usage"]["prompt_tokens"] if status == 200 else str(body)[:300])

    other = threading.Thread(target=long_prompt)
    other.start()
    gaps, tokens, first, last = stream_gaps()
    other.join()
    overlap = result["long_start"] < last and result["long_end"] > first
    print(json.dumps({"max_gap": round(max(gaps), 3), "tokens": tokens, "overlap": overlap, "long_status": result["long_status"],
                      "long_prompt_tokens": result["long_tokens"], "long_seconds": round(result["long_end"] - result["long_start"], 2)}))


def huge(pid):
    # Warm up, then the baseline.
    post("/v1/chat/completions", chat("Hi!", max_tokens=4))
    time.sleep(0.5)
    before = rss_kib(pid)
    text = ("All work and no play makes Jack a dull boy. " * 95000)[: 4 * 1000 * 1000]
    answers = []

    def flood():
        time.sleep(1.0)
        with ThreadPoolExecutor(max_workers=4) as pool:
            answers.extend(pool.map(lambda i: post("/v1/chat/completions" if i % 2 else "/v1/completions",
                                                   chat(text, max_tokens=4) if i % 2 else {"model": MODEL, "prompt": text, "max_tokens": 4}), range(4)))

    other = threading.Thread(target=flood)
    other.start()
    gaps, tokens, _, _ = stream_gaps()
    other.join()
    peak = rss_kib(pid)
    time.sleep(1.0)
    after = rss_kib(pid)
    print(json.dumps({"max_gap": round(max(gaps), 3), "tokens": tokens, "statuses": [a[0] for a in answers],
                      "messages": [str(a[2])[:200] for a in answers], "rss_before_kib": before, "rss_peak_kib": peak, "rss_after_kib": after}))


def conns():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    held, refused = [], 0
    for i in range(10000):
        s = socket.socket()
        try:
            s.connect((HOST, PORT))
            kind = i % 4
            if kind == 1:
                s.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # headers never end
            elif kind == 2:
                s.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")  # slow body
            held.append((kind, s))
        except OSError:
            refused += 1
            s.close()
    # Meanwhile, an ordinary client.
    t0 = time.monotonic()
    with urllib.request.urlopen(BASE + "/health", timeout=30) as r:
        health_status = r.status
    health_seconds = time.monotonic() - t0
    t0 = time.monotonic()
    status, _, body = post("/v1/chat/completions", chat("Hi!", max_tokens=4), timeout=30)
    chat_seconds = time.monotonic() - t0
    # One slow header and one slow body, watched from the start.
    def watched(payload):
        s = socket.create_connection((HOST, PORT))
        s.send(payload)
        s.settimeout(60)
        t = time.monotonic()
        data = b""
        try:
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
                # Keep trickling a body byte now and then: still too slow.
        except OSError:
            pass
        s.close()
        return round(time.monotonic() - t, 2), data.split(b"\r\n", 1)[0].decode("latin-1")

    header = watched(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    body_ = watched(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{\"mo")
    for _, s in held:
        s.close()
    print(json.dumps({"opened": len(held), "refused": refused, "health_status": health_status, "health_seconds": round(health_seconds, 2),
                      "chat_status": status, "chat_seconds": round(chat_seconds, 2),
                      "slow_header_closed_after": header[0], "slow_header_answer": header[1],
                      "slow_body_closed_after": body_[0], "slow_body_answer": body_[1]}))


if MODE == "burst":
    burst()
elif MODE == "gap":
    gap()
elif MODE == "huge":
    huge(int(sys.argv[3]))
elif MODE == "conns":
    conns()
else:
    sys.exit(f"unknown mode {MODE}")
