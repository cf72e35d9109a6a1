"""The official `openai` Python package against a Hotpot gateway.

Usage: python3 openai_client.py BASE_URL GOOD_KEY SMALL_BUDGET_KEY SLOW_KEY

Run by crates/cli/tests/gateway.rs over a real 3-node swarm. Every check
raises on failure; the last line printed is "all openai client checks passed".
"""

import sys

import openai
from openai import OpenAI

base_url, good_key, budget_key, slow_key = sys.argv[1:5]
MODEL = "smollm2-135m"


def client(key):
    # No retries: a 429 or 5xx must surface as the client's own exception.
    return OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)


api = client(good_key)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

# Model listing.
models = [m.id for m in api.models.list()]
assert models == [MODEL], models

# Chat, non-streaming, greedy.
r = api.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24)
text = r.choices[0].message.content
assert "Paris" in text, text
assert r.choices[0].message.role == "assistant"
assert r.choices[0].finish_reason in ("stop", "length")
assert r.usage.prompt_tokens > 10 and r.usage.completion_tokens > 0
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
assert r.object == "chat.completion" and r.model == MODEL

# System messages and content as a list of text parts give the same prompt.
parts = [{"role": "system", "content": "You are terse."},
         {"role": "user", "content": [{"type": "text", "text": "What is the capital "}, {"type": "text", "text": "of France?"}]}]
plain = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the capital of France?"}]
a = api.chat.completions.create(model=MODEL, messages=parts, temperature=0, max_completion_tokens=12)
b = api.chat.completions.create(model=MODEL, messages=plain, temperature=0, max_tokens=12)
assert a.choices[0].message.content == b.choices[0].message.content
assert a.usage.prompt_tokens == b.usage.prompt_tokens

# Streaming chat gives the same text as non-streaming, and usage at the end.
stream = api.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24, stream=True,
                                     stream_options={"include_usage": True})
pieces, finish, usage = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason
assert "".join(pieces) == text, ("".join(pieces), text)
assert finish == r.choices[0].finish_reason
assert usage is not None and usage.completion_tokens == r.usage.completion_tokens

# Stop strings cut the text and are not returned.
s = api.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24, stop=["Paris"])
assert "Paris" not in s.choices[0].message.content and s.choices[0].finish_reason == "stop", s.choices[0]
s2 = api.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24, stop="France")
assert "France" not in s2.choices[0].message.content

# n=2 and seed reproducibility.
story = [{"role": "user", "content": "Tell me a story about a dragon."}]
x = api.chat.completions.create(model=MODEL, messages=story, n=2, seed=7, temperature=1.0, max_tokens=24)
assert len(x.choices) == 2 and [c.index for c in x.choices] == [0, 1]
y = api.chat.completions.create(model=MODEL, messages=story, n=2, seed=7, temperature=1.0, max_tokens=24)
assert [c.message.content for c in x.choices] == [c.message.content for c in y.choices], "same seed, same text"
z = api.chat.completions.create(model=MODEL, messages=story, n=1, seed=8, temperature=1.0, max_tokens=24)
assert z.choices[0].message.content != x.choices[0].message.content, "another seed, other text"

# Logprobs.
l = api.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
content = l.choices[0].logprobs.content
assert len(content) == l.usage.completion_tokens
for t in content:
    assert t.logprob <= 0 and len(t.top_logprobs) == 3
    assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
    assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-6, "greedy picks the top token"

# Penalties and user are accepted.
api.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, presence_penalty=0.5, frequency_penalty=0.5, user="test")

# Completions: text, token ids, streaming, echo with prompt logprobs.
c = api.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8)
assert c.choices[0].text.startswith(" Paris"), c.choices[0].text
# logit_bias: -100 on " Paris" (token 7042) makes the greedy answer another one.
banned = api.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8, logit_bias={"7042": -100})
assert not banned.choices[0].text.startswith(" Paris"), banned.choices[0].text
ids = api.completions.create(model=MODEL, prompt=[504, 3575, 282, 4649, 314], temperature=0, max_tokens=8)
assert ids.choices[0].text == c.choices[0].text
streamed = "".join(ch.choices[0].text for ch in api.completions.create(
    model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8, stream=True) if ch.choices)
assert streamed == c.choices[0].text, (streamed, c.choices[0].text)
e = api.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=0, echo=True, logprobs=1)
lp = e.choices[0].logprobs
assert e.choices[0].text == "The capital of France is"
assert lp.tokens == ["The", " capital", " of", " France", " is"], lp.tokens
assert lp.token_logprobs[0] is None and all(v < 0 for v in lp.token_logprobs[1:])
assert lp.text_offset == [0, 3, 11, 14, 21]
assert e.usage.prompt_tokens == 5 and e.usage.completion_tokens == 0

# Errors raise the client's own exception types.
def raises(kind, call, code=None):
    try:
        call()
    except kind as err:
        if code is not None:
            assert err.code == code, (err.code, code)
        return err
    raise AssertionError(f"expected {kind.__name__}")

raises(openai.NotFoundError, lambda: api.chat.completions.create(model="no-such-model", messages=QUESTION), "model_not_found")
raises(openai.BadRequestError, lambda: api.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=100000),
       "context_length_exceeded")
raises(openai.BadRequestError, lambda: api.chat.completions.create(model=MODEL, messages=QUESTION, temperature=5))
raises(openai.BadRequestError, lambda: api.chat.completions.create(model=MODEL, messages=[]))
raises(openai.AuthenticationError, lambda: client("sk-wrong").chat.completions.create(model=MODEL, messages=QUESTION))
big = raises(openai.APIStatusError, lambda: api.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "x" * (5 << 20)}]))
assert big.status_code == 413, big.status_code

# A key with a tiny budget (50 tokens): one request (prompt + max_tokens) fits
# in it, the next cannot reserve what it may use and is refused.
small = client(budget_key)
small.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)
raises(openai.RateLimitError, lambda: small.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4), "insufficient_quota")
# A key limited to one request a minute.
slow = client(slow_key)
slow.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)
raises(openai.RateLimitError, lambda: slow.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2), "rate_limit_exceeded")

print("all openai client checks passed")
