"""Qwen2.5-Coder 1.5B through a Hotpot swarm, with the official `openai` client.

Usage: python3 qwen_client.py BASE_URL

Chat (plain and streaming) and a completion with echo and log-probabilities
of the prompt. Every check raises on failure; the last line printed is
"all qwen client checks passed".
"""

import sys

from openai import OpenAI

base_url = sys.argv[1]
MODEL = "qwen2.5-coder-1.5b"
api = OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=300)

assert [m.id for m in api.models.list()] == [MODEL]

messages = [{"role": "user", "content": "Write a Python function that reverses a string."}]
r = api.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24)
text = r.choices[0].message.content
print("chat:", repr(text))
assert "def " in text or "reverse" in text.lower(), text
assert r.usage.prompt_tokens > 20 and r.usage.completion_tokens > 0

stream = api.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24, stream=True)
streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
assert streamed == text, (streamed, text)

prompt = "def quicksort(arr):"
c = api.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=2, temperature=0)
lp = c.choices[0].logprobs
print("echo:", repr(c.choices[0].text), lp.token_logprobs)
assert c.choices[0].text == prompt, c.choices[0].text
assert lp.token_logprobs[0] is None and all(v is not None and v <= 0 for v in lp.token_logprobs[1:]), lp.token_logprobs
assert len(lp.tokens) == c.usage.prompt_tokens

c = api.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
print("completion:", repr(c.choices[0].text))
assert c.usage.completion_tokens > 0

print("all qwen client checks passed")
