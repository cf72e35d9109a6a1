"""The Responses API (issue 14) with the official `openai` client: text,
streamed and not, function tools round trip, streamed calls, a forced call,
text.format json_schema, and what is refused.

Usage: python3 responses.py BASE_URL MODEL

Every check raises on failure; the last line printed is "all responses checks passed".
"""

import json
import sys

import jsonschema
import openai
from openai import OpenAI

base_url, model = sys.argv[1], sys.argv[2]
api = OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=300)

# Text, one answer.
r = api.responses.create(model=model, instructions="Answer in one short sentence.", input="What is the capital of France?",
                         temperature=0, max_output_tokens=24)
print("text:", r.output_text)
assert r.object == "response" and r.status in ("completed", "incomplete") and r.model == model, r
assert "Paris" in r.output_text, r.output_text
assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 24 and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens, r.usage
assert r.output[0].type == "message" and r.output[0].content[0].type == "output_text", r.output

# The same streamed: the deltas make the final text, events in order.
stream = api.responses.create(model=model, instructions="Answer in one short sentence.", input="What is the capital of France?",
                              temperature=0, max_output_tokens=24, stream=True)
kinds, deltas, final = [], [], None
for event in stream:
    kinds.append(event.type)
    if event.type == "response.output_text.delta":
        deltas.append(event.delta)
    if event.type in ("response.completed", "response.incomplete"):
        final = event.response
assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] in ("response.completed", "response.incomplete"), kinds
assert "response.output_item.added" in kinds and "response.output_item.done" in kinds, kinds
assert final is not None and "".join(deltas) == final.output_text == r.output_text, (deltas, final)

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]},
}
question = [{"role": "user", "content": "What is the weather like in Paris right now?"}]

# A function call, one answer.
r = api.responses.create(model=model, input=question, tools=[WEATHER], temperature=0, max_output_tokens=80)
calls = [o for o in r.output if o.type == "function_call"]
print("call:", calls)
assert calls and calls[0].name == "get_weather" and calls[0].call_id and r.status == "completed", r.output
arguments = json.loads(calls[0].arguments)
jsonschema.validate(arguments, WEATHER["parameters"])
assert "paris" in arguments["city"].lower(), arguments

# The same call streamed.
streamed, done_items = [], []
for event in api.responses.create(model=model, input=question, tools=[WEATHER], temperature=0, max_output_tokens=80, stream=True):
    if event.type == "response.function_call_arguments.done":
        streamed.append(event.arguments)
    if event.type == "response.output_item.done" and event.item.type == "function_call":
        done_items.append((event.item.name, event.item.arguments))
assert streamed == [calls[0].arguments] and done_items == [("get_weather", calls[0].arguments)], (streamed, done_items)

# The tool's output goes back; the model answers in words.
follow = question + [
    {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
    {"type": "function_call_output", "call_id": calls[0].call_id, "output": json.dumps({"temperature": 18, "unit": "celsius", "sky": "cloudy"})},
]
r = api.responses.create(model=model, input=follow, tools=[WEATHER], tool_choice="none", temperature=0, max_output_tokens=60)
print("final:", r.output_text)
assert "18" in r.output_text, r.output_text

# A forced call.
r = api.responses.create(model=model, input="Say hello.", tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"},
                         temperature=0, max_output_tokens=80)
forced = [o for o in r.output if o.type == "function_call"]
assert forced and forced[0].name == "get_weather", r.output
jsonschema.validate(json.loads(forced[0].arguments), WEATHER["parameters"])

# text.format json_schema: the text parses and validates.
schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
          "required": ["city", "population"], "additionalProperties": False}
r = api.responses.create(model=model, input="Give the largest city of Japan and its population as JSON.", temperature=0, max_output_tokens=60,
                         text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}})
jsonschema.validate(json.loads(r.output_text), schema)
print("json_schema:", r.output_text)

# Refused clearly.
for bad in [dict(previous_response_id="resp_123"), dict(tools=[{"type": "web_search"}])]:
    try:
        api.responses.create(model=model, input="Hi", max_output_tokens=4, **bad)
        raise AssertionError(f"accepted {bad}")
    except openai.BadRequestError:
        pass
print("all responses checks passed")
