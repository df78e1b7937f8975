"""Tool calling on the real model, over real HTTP with the real `openai` client against `corejax serve`, and through
the Python API: forced calls (tool_choice "required" and named) whose arguments validate against the tool's
schema, streamed call deltas the client accumulates, a tool-result round trip, "none", and malformed requests.

SmolLM2-135M's template is plain ChatML (no tools): the generic format, tools in a system message."""

from __future__ import annotations

import json

import jsonschema
import pytest
from references import require
from test_server import API_KEY, GENERATOR, ServerProcess

openai = require("openai")

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time now in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                   "required": ["zone"]}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
FIRST = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_gguf):
    s = ServerProcess(tmp_path_factory.mktemp("serve-tools"), "-m", GENERATOR, "--api-key", API_KEY,
                      "--max-tokens", "256")
    yield s
    assert s.stop() == 0, s.log_text()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)


def _check_calls(calls, names=None) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("choice", ["required", FIRST])
def test_forced_calls_validate_against_the_tool_schema(client, choice):
    r = client.chat.completions.create(model=GENERATOR, messages=ASK, tools=TOOLS, tool_choice=choice,
                                       parallel_tool_calls=False, max_tokens=80, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    assert len(c.message.tool_calls) == 1
    _check_calls(c.message.tool_calls, None if choice == "required" else {"get_weather"})
    assert "<tool_call>" not in (c.message.content or "")


def test_streamed_call_deltas_accumulate_into_the_same_call(client):
    kw = {"model": GENERATOR, "messages": ASK, "tools": TOOLS, "tool_choice": FIRST, "parallel_tool_calls": False,
          "max_tokens": 80, "temperature": 0}
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:  # OpenAI's accumulation: by index, arguments concatenated
            acc = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            acc["id"] = d.id or acc["id"]
            acc["name"] += (d.function.name or "") if d.function else ""
            acc["arguments"] += (d.function.arguments or "") if d.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert list(calls) == [0]
    assert calls[0]["name"] == whole.function.name == "get_weather"
    assert json.loads(calls[0]["arguments"]) == json.loads(whole.function.arguments)  # greedy: the same call
    jsonschema.validate(json.loads(calls[0]["arguments"]), SCHEMAS["get_weather"])
    assert "<tool_call>" not in content


def test_a_tool_result_round_trip_generates_an_answer(client):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18, "sky": "clear"}'}]
    r = client.chat.completions.create(model=GENERATOR, messages=messages, tools=TOOLS, tool_choice="none",
                                       max_tokens=24, temperature=0)
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length") and c.message.content and not c.message.tool_calls
    assert r.usage.prompt_tokens > 60  # the system message with the tools, the call and its result went in


def test_tool_choice_none_gives_no_calls(client):
    r = client.chat.completions.create(model=GENERATOR, messages=ASK, tools=TOOLS, tool_choice="none",
                                       max_tokens=16, temperature=0)
    assert r.choices[0].finish_reason != "tool_calls" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"name": "no spaces allowed"}}]}, "tools"),
    ({"tools": "get_weather"}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_malformed_tool_requests_get_a_400_naming_the_field(server, extra, param):
    status, _, body = server.request("POST", "/v1/chat/completions",
                                     {"model": GENERATOR, "messages": ASK, "max_tokens": 4, **extra})
    assert status == 400, body
    assert body["error"]["param"] == param and body["error"]["message"]


def test_malformed_tool_messages_get_a_400(server):
    bad_call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}]}
    status, _, body = server.request("POST", "/v1/chat/completions",
                                     {"model": GENERATOR, "messages": ASK + [bad_call], "max_tokens": 4})
    assert status == 400 and body["error"]["param"] == "messages" and "arguments" in body["error"]["message"]


# --- the Python API -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def session(smollm2_gguf):
    from corejax import Session

    with Session(GENERATOR, progress=False) as s:
        yield s


def test_session_forced_call_and_stream(session):
    r = session.generate(messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                         max_tokens=80, temperature=0)
    assert r.finish_reason == "tool_calls" and len(r.tool_calls) == 1
    call = r.tool_calls[0]
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
    chunks = list(session.stream_chunks(messages=ASK, tools=TOOLS, tool_choice="required",
                                        parallel_tool_calls=False, max_tokens=80, temperature=0))
    streamed = [c for chunk in chunks for c in chunk.tool_calls]
    assert [c["function"] for c in streamed] == [call["function"]]  # greedy: the same call, once
    assert "<tool_call>" not in "".join(chunk.text for chunk in chunks)
    assert chunks[-1].result.tool_calls[0]["function"] == call["function"]
    assert "".join(session.stream(messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                                  max_tokens=80, temperature=0)) == r.text


def test_session_refuses_tools_without_a_chat_and_bad_tools(session):
    from corejax.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="messages"):
        session.generate("a prompt", tools=TOOLS)
    with pytest.raises(InvalidParameterError, match="tool_choice"):
        session.generate(messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "x"}})


# --- reasoning: a tiny random model carrying a template that opens <think> itself (DeepSeek-R1's, as llama.cpp
# keeps it): its reply starts inside the thoughts and, being random, never closes them


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    from tiny_model import write_tiny_llama
    from tokenizer_testdata import chat_templates_dir

    template = (chat_templates_dir() / "llama-cpp-deepseek-r1.jinja").read_text(encoding="utf-8")
    tmp = tmp_path_factory.mktemp("serve-think")
    path = write_tiny_llama(tmp / "thinker.gguf", context=512, chat_template=template)
    s = ServerProcess(tmp, "-m", str(path), "--api-key", API_KEY, "--max-tokens", "64")
    yield openai.OpenAI(base_url=s.base_url, api_key=API_KEY, max_retries=0)
    assert s.stop() == 0, s.log_text()


def test_reasoning_comes_apart_over_http(thinker):
    kw = {"model": "", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12, "temperature": 0}
    message = thinker.chat.completions.create(**kw).choices[0].message
    thoughts = message.model_extra["reasoning_content"]
    assert thoughts and "</think>" not in thoughts and not message.content
    streamed = ""
    for chunk in thinker.chat.completions.create(stream=True, **kw):
        if chunk.choices:
            delta = chunk.choices[0].delta
            assert not delta.content
            streamed += (delta.model_extra or {}).get("reasoning_content") or ""
    assert streamed == thoughts
