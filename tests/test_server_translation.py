"""The translations of Ollama's and Anthropic's requests into OpenAI's chat body and back (corejax/server/ollama.py,
anthropic.py, responses.py), tools and tool calls included, checked without a server; and that what they build
is what the chat path's own validation (schema.generation_request) reads as intended."""

from __future__ import annotations

import json

import pytest

from corejax.server import anthropic, ollama, responses, schema
from corejax.server.schema import ApiError


def test_ollama_options_map_ignore_and_refuse():
    got = ollama.options({"options": {"num_predict": 5, "repeat_penalty": 1.1, "repeat_last_n": -1, "num_thread": 4,
                                      "num_ctx": 8192, "seed": 3, "stop": ["\n"], "mirostat": 0, "top_k": 7}})
    assert got == {"max_tokens": 5, "repetition_penalty": 1.1, "seed": 3, "stop": ["\n"], "top_k": 7}
    req = schema.generation_request({"messages": [{"role": "user", "content": "hi"}], **got}, chat=True,
                                    max_tokens_limit=64)
    assert req.seed == 3 and req.sampling == {"max_tokens": 5, "repetition_penalty": 1.1, "stop": ["\n"],
                                              "top_k": 7}
    assert ollama.options({"options": {"num_predict": -1}}) == {}  # no limit: the server's
    for bad in ({"mirostat": 1}, {"tfs_z": 0.5}, {"repeat_penalty": 1.2, "repeat_last_n": 64}, {"shiny": True},
                {"num_predict": 0}, {"repeat_penalty": 1.2, "penalize_newline": False}):
        with pytest.raises(ApiError) as e:
            ollama.options({"options": bad})
        assert e.value.status == 400 and "options" == e.value.param


def test_ollama_format():
    assert ollama.response_format("json") == {"type": "json_object"}
    fmt = ollama.response_format({"type": "object", "properties": {"a": {"type": "integer"}}})
    req = schema.generation_request({"messages": [{"role": "user", "content": "hi"}], "response_format": fmt},
                                    chat=True, max_tokens_limit=64)
    assert req.sampling["constraint"] is not None
    with pytest.raises(ApiError):
        ollama.response_format("yaml")


def test_ollama_tools_and_tool_calls_translate_both_ways():
    tools = [{"function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    assert ollama.ollama_tools(tools) == [{"type": "function", "function": tools[0]["function"]}]
    messages = [{"role": "user", "content": "Weather in Paris and Rome?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                    {"function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
                {"role": "tool", "content": "20C", "tool_name": "get_weather"},
                {"role": "tool", "content": "25C", "tool_name": "get_weather"}]
    out = ollama.ollama_messages(messages)
    calls = out[1]["tool_calls"]
    assert [c["type"] for c in calls] == ["function", "function"] and len({c["id"] for c in calls}) == 2
    assert json.loads(calls[1]["function"]["arguments"]) == {"city": "Rome"}
    assert [m["tool_call_id"] for m in out[2:]] == [calls[0]["id"], calls[1]["id"]]  # in order, per tool
    assert "tool_name" not in out[2]
    back = ollama.ollama_tool_calls([{"id": "c1", "type": "function",
                                      "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}])
    assert back == [{"id": "c1", "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Oslo"}}}]
    with pytest.raises(ApiError):
        ollama.ollama_messages([{"role": "user", "content": "hi", "images": ["aGk="]}])


def test_anthropic_tools_tool_choice_and_blocks():
    tools = anthropic.anthropic_tools([{"name": "get_weather", "description": "Weather now",
                                        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}])
    assert tools == [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                                       "parameters": {"type": "object",
                                                                      "properties": {"city": {"type": "string"}}}}}]
    assert anthropic.anthropic_tool_choice({"type": "auto"}) == ("auto", None)
    assert anthropic.anthropic_tool_choice({"type": "any", "disable_parallel_tool_use": True}) == ("required", False)
    assert anthropic.anthropic_tool_choice({"type": "none"}) == ("none", None)
    assert anthropic.anthropic_tool_choice({"type": "tool", "name": "get_weather"}) == (
        {"type": "function", "function": {"name": "get_weather"}}, None)
    with pytest.raises(ApiError):
        anthropic.anthropic_tools([{"type": "web_search_20250305", "name": "web_search"}])
    out = anthropic.anthropic_messages([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Looking."},
                                          {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "20C"},
                                     {"type": "text", "text": "Thanks."}]}])
    assert out[1] == {"role": "assistant", "content": "Looking.", "tool_calls": [
        {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    assert out[2] == {"role": "tool", "tool_call_id": "toolu_1", "content": "20C"}
    assert out[3] == {"role": "user", "content": "Thanks."}
    blocks = anthropic.tool_use_blocks([{"id": "call_9", "type": "function",
                                         "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}])
    assert blocks == [{"type": "tool_use", "id": "call_9", "name": "get_weather", "input": {"city": "Rome"}}]


def test_anthropic_body_and_stop_reason():
    body = anthropic.openai_body({"model": "m", "max_tokens": 9, "system": [{"type": "text", "text": "Be brief."}],
                                  "messages": [{"role": "user", "content": "hi"}], "top_k": 5,
                                  "stop_sequences": ["END"], "metadata": {"user_id": "u"}})
    assert body["messages"][0] == {"role": "system", "content": "Be brief."} and body["stop"] == ["END"]
    req = schema.generation_request(body, chat=True, max_tokens_limit=64)
    assert req.sampling["top_k"] == 5 and req.sampling["max_tokens"] == 9 and req.top_logprobs == 0
    assert anthropic.stop_reason("stop", "one two ", ["one", " two", " EN", "D"], ["END"]) == ("stop_sequence", "END")
    assert anthropic.stop_reason("stop", "one two", ["one", " two", ""], ["END"]) == ("end_turn", None)
    assert anthropic.stop_reason("length", "x", ["x"], ["END"]) == ("max_tokens", None)
    assert anthropic.stop_reason("tool_calls", "", [], None) == ("tool_use", None)
    with pytest.raises(ApiError) as e:
        anthropic.openai_body({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert "max_tokens" in e.value.message


def test_responses_body():
    body = responses.openai_body({"model": "m", "instructions": "Be brief.", "max_output_tokens": 7,
                                  "input": [{"type": "message", "role": "user",
                                             "content": [{"type": "input_text", "text": "hi"}]}],
                                  "text": {"format": {"type": "json_object"}}, "store": False})
    req = schema.generation_request(body, chat=True, max_tokens_limit=64)
    assert req.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert req.sampling["max_tokens"] == 7 and req.sampling["constraint"] is not None
    for bad in ({"previous_response_id": "resp_1"}, {"store": True}, {"reasoning": {"effort": "high"}}):
        with pytest.raises(ApiError):
            responses.openai_body({"model": "m", "input": "hi", **bad})


def test_responses_tools_and_function_call_items():
    body = responses.openai_body({"model": "m", "tool_choice": {"type": "function", "name": "get_weather"},
                                  "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"},
                                             "strict": True}],
                                  "input": [{"role": "user", "content": "Weather in Paris and Rome?"},
                                            {"type": "function_call", "call_id": "c1", "name": "get_weather",
                                             "arguments": '{"city": "Paris"}'},
                                            {"type": "function_call", "call_id": "c2", "name": "get_weather",
                                             "arguments": '{"city": "Rome"}'},
                                            {"type": "function_call_output", "call_id": "c1", "output": "20C"},
                                            {"type": "function_call_output", "call_id": "c2", "output": "25C"}]})
    assert body["tools"] == [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"},
                                                               "strict": True}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assistant = body["messages"][1]
    assert [c["id"] for c in assistant["tool_calls"]] == ["c1", "c2"] and assistant["role"] == "assistant"
    assert body["messages"][2:] == [{"role": "tool", "tool_call_id": "c1", "content": "20C"},
                                    {"role": "tool", "tool_call_id": "c2", "content": "25C"}]
    items = responses.function_call_items([{"id": "c3", "type": "function",
                                            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}])
    assert items == [{"type": "function_call", "id": "fc_c3", "call_id": "c3", "name": "get_weather",
                      "arguments": '{"city": "Oslo"}', "status": "completed"}]
    with pytest.raises(ApiError):
        responses.openai_body({"model": "m", "input": "hi", "tools": [{"type": "web_search"}]})
