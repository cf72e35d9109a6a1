"""Keys an agent can carry (issue 13, acceptance 5 and 6), with the official
`openai` client over a real swarm whose nodes ask 0.1 credit per 1,000
positions.

Usage: python3 agent_keys.py BASE_URL ROOT_KEY GATEWAY_PEER_ID HOTPOT_BIN WORKDIR

ROOT_KEY is prepaid (100 credits in the books) and has no limits of its
own. Every check raises on failure; the last line printed is
"all agent key checks passed".
"""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import openai
from openai import OpenAI

base_url, root_key, gateway_peer, hotpot_bin, workdir = sys.argv[1:6]
MODEL = "smollm2-135m"


def call(method, path, key, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base_url}{path}", data=data, method=method, headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def mint(parent, **limits):
    status, body = call("POST", "/hotpot/keys", parent, limits)
    return status, body


def client(key):
    return OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)


def ask(key, model=MODEL):
    return client(key).chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8, temperature=0)


def credits(text):
    return float(text)


def settled(key, deadline=30):
    """The key's status once no request holds anything (an answer is out
    before its sessions are settled and logged)."""
    import time

    end = time.time() + deadline
    while True:
        status, body = call("GET", "/hotpot/key", key)
        assert status == 200, (status, body)
        if body["reserved"] == 0 and body["credits_reserved"] == "0":
            return body
        assert time.time() < end, f"never settled: {body}"
        time.sleep(0.05)


# A child within the root's (absent) limits, with a credit limit of its own.
status, sub = mint(root_key, name="sub", credits="0.05", daily_limit="1")
assert status == 201, (status, sub)
sub_key = sub["key"]
assert sub["status"]["parent"] == "root", sub
assert sub["status"]["limits"]["credits"] == "0.05", sub

# A grandchild cannot ask for more than its parent has, or another model.
status, body = mint(sub_key, name="greedy", credits="1")
assert status == 403 and body["error"]["code"] == "limits_exceed_parent", (status, body)
status, body = mint(sub_key, name="late", daily_limit="2")
assert status == 403 and body["error"]["code"] == "limits_exceed_parent", (status, body)
status, worker = mint(sub_key, name="worker", credits="0.05", models=[MODEL])
assert status == 201, (status, worker)
worker_key = worker["key"]
assert worker["status"]["limits"]["daily_limit"] == "1", "an unset limit is the parent's"
# A sibling with the same limit: the two share their parent's 0.05.
status, sibling = mint(sub_key, name="sibling", credits="0.05")
assert status == 201, (status, sibling)

# A model outside a key's list is 403 (the openai client's PermissionDeniedError).
status, narrow = mint(root_key, name="narrow", models=["qwen2.5-coder-0.5b"])
assert status == 201, (status, narrow)
try:
    ask(narrow["key"])
    raise AssertionError("a key used a model outside its list")
except openai.PermissionDeniedError as e:
    assert e.status_code == 403 and "model_not_allowed" in str(e.body), e.body

# The worker spends until a limit stops it: its own 0.05 and its parent's
# 0.05 are shared, so the two together never spend more than 0.05.
served = 0
while True:
    try:
        ask(worker_key)
        served += 1
    except openai.RateLimitError as e:
        assert "insufficient_quota" in str(e.body), e.body
        break
    assert served < 100, "the limit never stopped the worker"
assert served >= 2, f"the worker was stopped after {served} requests"
worker_status = settled(worker_key)
sub_status = settled(sub_key)
print("worker:", json.dumps(worker_status))
print("sub:", json.dumps(sub_status))
assert credits(worker_status["credits_spent"]) > 0
assert credits(worker_status["credits_spent"]) <= 0.05
assert credits(worker_status["credits_reserved"]) == 0, worker_status
assert sub_status["credits_spent"] == worker_status["credits_spent"], "the child's spending counts against its parent"
assert worker_status["pays_from"] == "root", "a child pays from its root's account"
# The sibling has its own 0.05 untouched, but its parent has too little left.
try:
    ask(sibling["key"])
    raise AssertionError("a child spent past its parent's limit")
except openai.RateLimitError as e:
    assert "parent key" in str(e.body) and "sub" in str(e.body), e.body

# The worker's spend log verifies offline; any change, removal or
# reordering of an entry makes `hotpot spend verify` fail.
status, log = call("GET", "/hotpot/spend", worker_key)
assert status == 200 and len(log["entries"]) == served, (status, log)
assert log["gateway"] == gateway_peer, log
total = sum(int(e["amount"]) for e in log["entries"])
assert abs(total / 1e6 - credits(worker_status["credits_spent"])) < 1e-9, (total, worker_status)


def verify(entries_log):
    path = os.path.join(workdir, "spend.json")
    with open(path, "w") as f:
        json.dump(entries_log, f)
    return subprocess.run([hotpot_bin, "spend", "verify", path, "--gateway", gateway_peer], capture_output=True, text=True, timeout=60)


result = verify(log)
assert result.returncode == 0 and "holds" in result.stdout, result.stdout + result.stderr
changed = json.loads(json.dumps(log))
changed["entries"][0]["amount"] = 1
removed = json.loads(json.dumps(log))
del removed["entries"][0]
reordered = json.loads(json.dumps(log))
reordered["entries"][0], reordered["entries"][1] = reordered["entries"][1], reordered["entries"][0]
cut = json.loads(json.dumps(log))
cut["entries"].pop()
for name, bad in [("changed", changed), ("removed", removed), ("reordered", reordered), ("cut", cut)]:
    result = verify(bad)
    assert result.returncode != 0 and "BROKEN" in result.stdout, (name, result.stdout, result.stderr)
    print(f"a {name} spend log fails: {result.stdout.strip()}")

# Revoking the parent stops the child at once.
status, body = call("DELETE", "/hotpot/keys/sub", root_key)
assert status == 200, (status, body)
for key in (sub_key, worker_key):
    try:
        ask(key)
        raise AssertionError("a revoked key (or a child of one) was served")
    except openai.AuthenticationError as e:
        assert "revoked" in str(e.body), e.body
# A key cannot revoke its parent or a stranger.
status, body = call("DELETE", "/hotpot/keys/root", narrow["key"])
assert status == 404, (status, body)
ask(root_key)
print("all agent key checks passed")
