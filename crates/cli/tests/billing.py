"""Billing that cannot be cheated or lost, with the official `openai` client.

Usage: python3 billing.py BASE_URL OPEN_KEY BUDGET_KEY

OPEN_KEY has no budget; BUDGET_KEY has a token budget of 1000. Run by
crates/cli/tests/gateway.rs over a real swarm. Every check raises on
failure; the last line printed is "all billing checks passed".
"""

import json
import sys
import threading
import time
import urllib.request

import openai
from openai import OpenAI

base_url, open_key, budget_key = sys.argv[1:4]
MODEL = "smollm2-135m"


def client(key):
    return OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)


def key_status(key):
    request = urllib.request.Request(f"{base_url}/hotpot/key", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def settled(key, deadline=30):
    """The key's status once nothing is reserved any more."""
    end = time.time() + deadline
    while True:
        status = key_status(key)
        if status["reserved"] == 0:
            return status
        assert time.time() < end, f"reservations never settled: {status}"
        time.sleep(0.1)


def node_sessions():
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/metrics", timeout=30) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("hotpot_node_sessions "):
                return float(line.split()[-1])
    return 0.0


# 1. A streaming client that leaves after a few chunks is charged for what
#    was generated for it (give or take the token in flight), and its node
#    sessions close.
api = client(open_key)
messages = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]
prompt_tokens = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, temperature=0).usage.prompt_tokens
before = settled(open_key)["spent"]
stream = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=300, temperature=0, stream=True)
received = 0
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        received += 1
    if received >= 5:
        break
stream.close()
after = settled(open_key)["spent"]
charged = after - before - prompt_tokens
print(f"disconnect: {received} tokens received, {charged} completion tokens charged")
assert received <= charged <= received + 3, (received, charged)
end = time.time() + 15
while node_sessions() > 0:
    assert time.time() < end, f"node sessions stayed open: {node_sessions()}"
    time.sleep(0.1)

# 2. A budget of 1000 tokens and 20 concurrent requests of max_tokens 100:
#    what is spent never exceeds the budget, equals what the answers
#    report, and the refused requests are 429 insufficient_quota.
budget = client(budget_key)
results = []
lock = threading.Lock()


def one(i):
    try:
        r = budget.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Count to {i + 3}."}], max_tokens=100,
                                           temperature=0.8, seed=i)
        outcome = ("ok", r.usage.total_tokens)
    except openai.RateLimitError as e:
        body = e.body if isinstance(e.body, dict) else {}
        outcome = ("429", body.get("code") or body.get("error", {}).get("code"))
    except Exception as e:  # anything else is a failure of the check
        outcome = ("error", repr(e))
    with lock:
        results.append(outcome)


threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
for t in threads:
    t.start()
for t in threads:
    t.join()
served = [r for r in results if r[0] == "ok"]
refused = [r for r in results if r[0] == "429"]
errors = [r for r in results if r[0] == "error"]
status = settled(budget_key)
print(f"budget: {len(served)} served, {len(refused)} refused, spent {status['spent']} of {status['token_budget']}")
assert not errors, errors
assert served and refused, results
assert all(code == "insufficient_quota" for _, code in refused), refused
assert status["spent"] <= 1000, status
assert status["spent"] == sum(tokens for _, tokens in served), (status, served)
assert status["remaining"] == status["token_budget"] - status["spent"], status

print("all billing checks passed")
