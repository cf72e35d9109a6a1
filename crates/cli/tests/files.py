"""The Files API (issue 14) with the official `openai` client, and a file
over the limit with curl.

Usage: python3 files.py BASE_URL WORKDIR

Every check raises on failure; the last line printed is "all file checks passed".
"""

import os
import subprocess
import sys

import openai
from openai import OpenAI

base_url, workdir = sys.argv[1], sys.argv[2]
api = OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)

lines = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}]}}\n'
path = os.path.join(workdir, "input.jsonl")
with open(path, "wb") as f:
    f.write(lines)
created = api.files.create(file=open(path, "rb"), purpose="batch")
assert created.object == "file" and created.bytes == len(lines) and created.purpose == "batch" and created.filename == "input.jsonl", created
assert created.id in [f.id for f in api.files.list().data]
assert api.files.retrieve(created.id).bytes == len(lines)
assert api.files.content(created.id).content == lines
try:
    api.files.create(file=open(path, "rb"), purpose="fine-tune")
    raise AssertionError("an unsupported purpose was accepted")
except openai.BadRequestError as e:
    assert "purpose" in str(e.body), e.body
deleted = api.files.delete(created.id)
assert deleted.deleted and deleted.id == created.id
try:
    api.files.retrieve(created.id)
    raise AssertionError("a deleted file is still there")
except openai.NotFoundError:
    pass

# A file over OpenAI's 200 MB limit is a 413.
big = os.path.join(workdir, "big.jsonl")
with open(big, "wb") as f:
    f.truncate(201 * 1024 * 1024)
out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-F", "purpose=batch", "-F", f"file=@{big}", f"{base_url}/files"], capture_output=True, text=True, timeout=120)
assert out.stdout == "413", out
os.remove(big)
assert all(f.filename != "big.jsonl" for f in api.files.list().data)
print("all file checks passed")
