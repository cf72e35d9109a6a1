"""The Batch API (issue 14) with the official `openai` client.

Usage:
  python3 batch.py submit BASE_URL KEY WORKDIR N   uploads N chat requests plus bad
      lines, creates the batch, and exits once about half of it is answered
      (the caller then kills the gateway with SIGKILL and starts it again);
  python3 batch.py finish BASE_URL KEY WORKDIR N   waits for that batch to
      complete on the restarted gateway and checks everything;
  python3 batch.py cancel BASE_URL KEY WORKDIR N   cancels a second batch
      mid-way.

Every check raises on failure; the last line printed is "batch <phase> passed".
"""

import json
import os
import sys
import time

import urllib.request
import openai
from openai import OpenAI

phase, base_url, key, workdir, n = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
api = OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)
state = os.path.join(workdir, "batch.json")
MODEL = "smollm2-135m"
TOPICS = ["the sea", "a cat", "bread", "rain", "a train", "music", "snow", "a garden", "coffee", "the moon"]


def chat_line(i):
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"Write one sentence about {TOPICS[i % len(TOPICS)]}."}],
            "max_tokens": 6, "temperature": 0}
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}


def upload(lines, name):
    path = os.path.join(workdir, name)
    with open(path, "w") as f:
        for line in lines:
            f.write(line if isinstance(line, str) else json.dumps(line))
            f.write("\n")
    return api.files.create(file=open(path, "rb"), purpose="batch")


def wait(batch_id, until, limit_s):
    started = time.time()
    while True:
        b = api.batches.retrieve(batch_id)
        if until(b):
            return b
        assert time.time() - started < limit_s, f"batch stuck: {b}"
        time.sleep(0.5)


def read_jsonl(file_id):
    if file_id is None:
        return []
    return [json.loads(l) for l in api.files.content(file_id).text.splitlines() if l.strip()]


def get_json(path):
    request = urllib.request.Request(f"{base_url}{path}", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.load(r)


def key_spent():
    return get_json("/hotpot/key")["spent"]


if phase == "submit":
    bad = [
        '{"custom_id": "bad-json", "method": "POST", "url": "/v1/chat/completions", "body": {"model": ',
        {"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {"model": MODEL, "input": "x"}},
        {"custom_id": "bad-model", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "no-such-model", "messages": [{"role": "user", "content": "Hi"}]}},
    ]
    lines = [chat_line(i) for i in range(n)]
    lines[n // 3:n // 3] = bad
    spent_before = key_spent()
    f = upload(lines, "input.jsonl")
    # Malformed requests to the route itself are 4xx, not a batch.
    for wrong in [{"input_file_id": f.id, "endpoint": "/v1/embeddings", "completion_window": "24h"},
                  {"input_file_id": f.id, "endpoint": "/v1/chat/completions", "completion_window": "1h"}]:
        try:
            api.batches.create(**wrong)
            raise AssertionError(f"accepted {wrong}")
        except openai.BadRequestError:
            pass
    try:
        api.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
        raise AssertionError("a batch over a missing file was accepted")
    except openai.NotFoundError:
        pass
    b = api.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"job": "test"})
    assert b.status == "validating" and b.endpoint == "/v1/chat/completions" and b.input_file_id == f.id, b
    assert b.metadata == {"job": "test"} and b.expires_at - b.created_at == 24 * 3600, b
    assert b.id in [x.id for x in api.batches.list().data]
    with open(state, "w") as out:
        json.dump({"batch": b.id, "spent_before": spent_before}, out)
    seen = set()
    half = wait(b.id, lambda x: (seen.add(x.status) or True) and x.request_counts.completed >= n // 2, 600)
    assert half.status == "in_progress" and half.request_counts.total == n + 3, half
    assert half.in_progress_at is not None and half.output_file_id is None, half
    print(f"half way: {half.request_counts}")
    print("batch submit passed")

elif phase == "finish":
    saved = json.load(open(state))
    b = wait(saved["batch"], lambda x: x.status in ("completed", "failed", "expired", "cancelled"), 900)
    assert b.status == "completed", b
    assert b.request_counts.total == n + 3 and b.request_counts.completed == n and b.request_counts.failed == 3, b.request_counts
    assert b.finalizing_at is not None and b.completed_at is not None, b
    out = read_jsonl(b.output_file_id)
    ids = [o["custom_id"] for o in out]
    assert len(out) == n and sorted(ids) == sorted(f"req-{i}" for i in range(n)), f"{len(out)} output lines, {len(set(ids))} distinct"
    tokens = 0
    for o in out:
        assert o["error"] is None and o["response"]["status_code"] == 200, o
        body = o["response"]["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"], o
        tokens += body["usage"]["total_tokens"]
    errors = {e["custom_id"]: e for e in read_jsonl(b.error_file_id)}
    assert set(errors) == {"bad-json", "bad-url", "bad-model"}, errors
    assert errors["bad-json"]["error"]["code"] == "invalid_json_line" and errors["bad-url"]["error"]["code"] == "invalid_url", errors
    assert errors["bad-model"]["response"]["status_code"] == 404, errors["bad-model"]
    # The key that created the batch is charged once per request: its
    # spending grew by exactly the tokens the answers report, and its
    # spend log has one entry per answered request.
    spent = key_spent() - saved["spent_before"]
    assert spent == tokens, f"the key was charged {spent} tokens for answers of {tokens}"
    log = get_json("/hotpot/spend")
    sessions = [e["session"] for e in log["entries"] if e["session"].startswith(b.id)]
    assert len(sessions) == n == len(set(sessions)), f"{len(sessions)} charges, {len(set(sessions))} distinct"
    print(f"completed: {b.request_counts}; {tokens} tokens charged once")
    print("batch finish passed")

elif phase == "cancel":
    f = upload([chat_line(i) for i in range(n)], "cancel.jsonl")
    b = api.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait(b.id, lambda x: x.request_counts.completed >= 4, 600)
    c = api.batches.cancel(b.id)
    assert c.status in ("cancelling", "cancelled"), c
    done = wait(b.id, lambda x: x.status == "cancelled", 300)
    assert done.cancelling_at is not None and done.cancelled_at is not None, done
    assert 4 <= done.request_counts.completed < n, done.request_counts
    out = read_jsonl(done.output_file_id)
    assert len(out) == done.request_counts.completed, (len(out), done.request_counts)
    try:
        api.batches.cancel(b.id)
        raise AssertionError("a cancelled batch was cancelled again")
    except openai.BadRequestError:
        pass
    print(f"cancelled with {done.request_counts.completed} of {n} answered")
    print("batch cancel passed")
