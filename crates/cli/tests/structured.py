"""Structured outputs and tools with the official `openai` client (issue 14).

Usage: python3 structured.py BASE_URL MODEL SCHEMAS [tools]

Runs the first SCHEMAS of 20 varied JSON schemas as `response_format`
`json_schema` (strict) and checks that every output parses and validates
(python `jsonschema`); checks `json_object`; then either (with `tools`) a
weather tool round trip, streamed and not, and a forced named call, or
(without) that `tools` on a model whose template has none is a 400.
Every check raises on failure; the last line printed is
"all structured output checks passed".
"""

import json
import sys

import jsonschema
import openai
from openai import OpenAI

base_url, model, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
with_tools = len(sys.argv) > 4 and sys.argv[4] == "tools"
api = OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}}, "required": ["x", "y"]},
    {"type": "object", "properties": {"city": {"type": "object", "properties": {"name": {"type": "string"}, "country": {"type": "string"}}, "required": ["name", "country"]}}, "required": ["city"]},
    {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"level": {"type": "integer", "minimum": 1, "maximum": 5}}, "required": ["level"]},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "confidence": {"type": "number"}}, "required": ["answer", "confidence"]},
    {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer"}, "label": {"type": "string"}}, "required": ["id", "label"]}, "maxItems": 2}}, "required": ["items"]},
    {"type": "string", "enum": ["alpha", "beta", "gamma"]},
    {"type": "object", "properties": {"title": {"type": "string", "maxLength": 30}, "year": {"type": "integer"}}, "required": ["title", "year"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3}}, "required": ["point"]},
    {"type": "object", "properties": {"status": {"const": "done"}, "count": {"type": "integer"}}, "required": ["status", "count"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {"email": {"type": "string"}, "admin": {"type": "boolean"}}, "required": ["email", "admin"]}}, "required": ["user"]},
    {"type": "integer"},
    {"type": "object", "properties": {"matrix": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}, "maxItems": 2}, "maxItems": 2}}, "required": ["matrix"]},
    {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "legs": {"type": "integer"}, "name": {"type": ["string", "null"]}}, "required": ["kind", "legs", "name"]},
    {"type": "object", "properties": {"price": {"type": "number", "minimum": 0}}, "required": ["price"]},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {"c": {"type": "string"}}, "required": ["c"]}}, "required": ["b"]}}, "required": ["a"]},
]

PROMPTS = ["Describe a person.", "Pick a color.", "Is the sky blue?", "Tag a photo of a beach.", "Give a point.", "Name a city.", "List some numbers.", "Rate this from 1 to 5.", "Is water wet?", "List two items.", "Pick a Greek letter.", "Name a film.", "Give a 3D point.", "Report the status.", "Describe a user.", "Pick a number.", "Give a small matrix.", "Describe a pet.", "Price a coffee.", "Nest some objects."]

for i, schema in enumerate(SCHEMAS[:count]):
    r = api.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPTS[i] + " Answer in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}},
        max_tokens=160,
        temperature=0.7,
        seed=i,
    )
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop", (i, r.choices[0].finish_reason, text)
    value = json.loads(text)
    jsonschema.validate(value, schema)
    print(f"schema {i}: {text}")

r = api.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Give me a JSON object with the name and the age of a dog."}],
    response_format={"type": "json_object"},
    max_tokens=200,
    temperature=0,
)
assert r.choices[0].finish_reason == "stop", r.choices[0]
assert isinstance(json.loads(r.choices[0].message.content), dict), r.choices[0].message.content
print("json_object:", r.choices[0].message.content)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]},
    },
}

if with_tools:
    messages = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
    r = api.chat.completions.create(model=model, messages=messages, tools=[WEATHER], temperature=0, max_tokens=80)
    choice = r.choices[0]
    print("tool call:", choice)
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    assert "paris" in arguments["city"].lower(), arguments

    stream = api.chat.completions.create(model=model, messages=messages, tools=[WEATHER], temperature=0, max_tokens=80, stream=True)
    streamed, finish = [], None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for c in delta.tool_calls or []:
            streamed.append((c.function.name, c.function.arguments))
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and streamed == [(call.function.name, call.function.arguments)], (streamed, finish)

    # The tool's answer goes back; the model answers in words (told not to
    # call again: the 1.5B model repeats its call when it may).
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "unit": "celsius", "sky": "cloudy"})},
    ]
    r = api.chat.completions.create(model=model, messages=messages, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=60)
    final = r.choices[0].message
    print("final answer:", final.content)
    assert final.content and "18" in final.content, final

    # A named tool_choice forces that call, arguments within its schema.
    r = api.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello."}],
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=80,
    )
    forced = r.choices[0].message.tool_calls
    assert forced and forced[0].function.name == "get_weather", r
    jsonschema.validate(json.loads(forced[0].function.arguments), WEATHER["function"]["parameters"])
else:
    try:
        api.chat.completions.create(model=model, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER], max_tokens=8)
        raise AssertionError("tools on a model without tool support were accepted")
    except openai.BadRequestError as e:
        assert "tool" in str(e.body), e.body

print("all structured output checks passed")
