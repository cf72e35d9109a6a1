"""Many users at once, and users who leave mid-stream.

Usage: python3 concurrency.py BASE_URL

16 concurrent streaming requests must each get their own output (equal to
the same request made alone); a client that disconnects mid-stream must
leave no sessions open on the nodes (the gateway's
hotpot_node_sessions_open gauge returns to 0).
"""

import http.client
import json
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI

base_url = sys.argv[1]
api = OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=300)
MODEL = "smollm2-135m"
PROMPTS = [f"Write the number {i} in words, then count to three:" for i in range(16)]


def alone(prompt):
    r = api.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=20)
    return r.choices[0].text


def streamed(prompt):
    out = []
    for chunk in api.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=20, stream=True):
        for choice in chunk.choices:
            out.append(choice.text)
    return "".join(out)


expected = [alone(p) for p in PROMPTS]
assert len(set(expected)) > 8, "the prompts give different outputs"
started = time.time()
with ThreadPoolExecutor(max_workers=16) as pool:
    got = list(pool.map(streamed, PROMPTS))
for i, (g, e) in enumerate(zip(got, expected)):
    assert g == e, f"stream {i}: {g!r} != {e!r}"
print(f"16 concurrent streams: all outputs match, {time.time() - started:.1f} s")


def sessions_open():
    url = urllib.parse.urlparse(base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    for line in text.splitlines():
        if line.startswith("hotpot_node_sessions_open "):
            return int(float(line.split()[1]))
    raise AssertionError("no hotpot_node_sessions_open in /metrics")


# Leave in the middle of a long stream: the sessions on the nodes close.
url = urllib.parse.urlparse(base_url)
for _ in range(3):
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    body = json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "stream": True})
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = response = conn.getresponse()
    assert response.status == 200
    seen = 0
    while seen < 5:
        line = response.fp.readline()
        if line.startswith(b"data: {"):
            seen += 1
    assert sessions_open() > 0, "sessions are open while streaming"
    conn.sock.close()
    conn.close()

deadline = time.time() + 30
while sessions_open() != 0:
    assert time.time() < deadline, f"{sessions_open()} node sessions still open after clients left"
    time.sleep(0.2)
print("disconnected clients left no sessions open")
print("all concurrency checks passed")
