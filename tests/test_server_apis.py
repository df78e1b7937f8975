"""Anthropic's Messages API, OpenAI's Responses API, /tokenize, /detokenize and rerank on `corejax serve`
(corejax/server/anthropic.py, responses.py, extras.py): the real `anthropic` and `openai` packages over loopback
HTTP against a real server process, raw HTTP for the error cases."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import time
from pathlib import Path

import jsonschema
import pytest
from references import require
from test_server import API_KEY, ENCODER, GENERATOR, ServerProcess

anthropic = require("anthropic")  # test dependencies (pyproject [test])
openai = require("openai")

SYSTEM = "You are brief."
GREEDY = {"extra_body": {"temperature": 0}}  # Anthropic's SDK 2.x no longer types the sampling fields
USER = "Name a primary colour."


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_gguf):
    s = ServerProcess(tmp_path_factory.mktemp("serve"), "-m", GENERATOR, "-m", ENCODER, "--api-key", API_KEY,
                      "--max-tokens", "512")
    yield s
    assert s.stop() == 0, s.log_text()


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=f"http://127.0.0.1:{server.port}", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)


def _openai_greedy(server, max_tokens: int) -> dict:
    status, _, body = server.request("POST", "/v1/chat/completions", {
        "model": GENERATOR, "max_tokens": max_tokens, "temperature": 0,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]})
    assert status == 200, body
    return body


# --- Anthropic ------------------------------------------------------------------------------------------------

def test_messages_equal_the_openai_path(server, claude):
    want = _openai_greedy(server, 12)
    m = claude.messages.create(model=GENERATOR, max_tokens=12, **GREEDY, system=SYSTEM,
                               messages=[{"role": "user", "content": USER}])
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert [b.type for b in m.content] == ["text"] and m.content[0].text == want["choices"][0]["message"]["content"]
    assert m.stop_reason == {"stop": "end_turn", "length": "max_tokens"}[want["choices"][0]["finish_reason"]]
    assert (m.usage.input_tokens, m.usage.output_tokens) == (want["usage"]["prompt_tokens"],
                                                             want["usage"]["completion_tokens"])
    blocks = claude.messages.create(model=GENERATOR, max_tokens=12, **GREEDY,
                                    system=[{"type": "text", "text": SYSTEM}],
                                    messages=[{"role": "user", "content": [{"type": "text", "text": USER}]}])
    assert blocks.content[0].text == m.content[0].text


def test_messages_stream_accumulates_the_greedy_text(claude):
    kw = dict(model=GENERATOR, max_tokens=16, **GREEDY, system=SYSTEM,
              messages=[{"role": "user", "content": USER}])
    whole = claude.messages.create(**kw)
    with claude.messages.stream(**kw) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 2 and "".join(pieces) == whole.content[0].text == final.content[0].text
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens
    events = [e.type for e in claude.messages.create(**kw, stream=True)]
    assert events[:2] == ["message_start", "content_block_start"] and events[-2:] == ["message_delta", "message_stop"]
    assert "content_block_delta" in events and "content_block_stop" in events


def test_messages_sampling_and_stop_sequences(claude):
    hi = [{"role": "user", "content": "Write a word."}]
    top1 = claude.messages.create(model=GENERATOR, max_tokens=12, messages=hi,
                                  extra_body={"temperature": 1.0, "top_p": 0.9, "top_k": 1})
    assert top1.content[0].text == claude.messages.create(model=GENERATOR, max_tokens=12, messages=hi,
                                                          **GREEDY).content[0].text  # top_k 1 is greedy
    base = claude.messages.create(model=GENERATOR, max_tokens=40, **GREEDY,
                                  messages=[{"role": "user", "content": "Count from 1 to 10 with commas."}])
    text = base.content[0].text
    assert "5" in text  # so the stop below has something to cut
    cut = claude.messages.create(model=GENERATOR, max_tokens=40, **GREEDY, stop_sequences=["5"],
                                 messages=[{"role": "user", "content": "Count from 1 to 10 with commas."}])
    assert cut.content[0].text == text[:text.index("5")]
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", "5") and base.stop_reason == "max_tokens"
    with claude.messages.stream(model=GENERATOR, max_tokens=40, **GREEDY, stop_sequences=["9", "5"],
                                messages=[{"role": "user", "content": "Count from 1 to 10 with commas."}]) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == cut.content[0].text and final.stop_sequence == "5"
    unused = claude.messages.create(model=GENERATOR, max_tokens=40, **GREEDY, stop_sequences=["zebra"],
                                    messages=[{"role": "user", "content": "Count from 1 to 10 with commas."}])
    assert unused.content[0].text == text and (unused.stop_reason, unused.stop_sequence) == ("max_tokens", None)
    ended = claude.messages.create(model=GENERATOR, max_tokens=60, **GREEDY, stop_sequences=["zebra"],
                                   messages=[{"role": "user", "content": USER}])
    assert (ended.stop_reason, ended.stop_sequence) == ("end_turn", None)  # the end-of-turn token, not a stop
    short = claude.messages.create(model=GENERATOR, max_tokens=3, **GREEDY,
                                   messages=[{"role": "user", "content": "Tell me a long story."}])
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3


def test_messages_output_config_format(claude):
    schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 10}},
              "required": ["colour"], "additionalProperties": False}
    m = claude.messages.create(model=GENERATOR, max_tokens=40, **GREEDY,
                               messages=[{"role": "user", "content": "Name a colour as JSON."}],
                               output_config={"format": {"type": "json_schema", "schema": schema}})
    jsonschema.validate(json.loads(m.content[0].text), schema)


def test_count_tokens(server, claude):
    want = _openai_greedy(server, 1)
    n = claude.messages.count_tokens(model=GENERATOR, system=SYSTEM, messages=[{"role": "user", "content": USER}])
    assert n.input_tokens == want["usage"]["prompt_tokens"]


@pytest.mark.parametrize("body, status, kind, words", [
    ({"model": GENERATOR, "messages": [{"role": "user", "content": "hi"}]}, 400, "invalid_request_error",
     "max_tokens"),
    ({"model": "claude-nope", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}, 404,
     "not_found_error", "is not served here"),
    ({"model": GENERATOR, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]}, 400,
     "invalid_request_error", "image"),
    ({"model": GENERATOR, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
      "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, 400, "invalid_request_error", "server tools"),
    ({"model": GENERATOR, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
      "tool_choice": {"type": "sometimes"}}, 400, "invalid_request_error", "tool_choice"),
    ({"model": GENERATOR, "max_tokens": 100000, "messages": [{"role": "user", "content": "hi"}]}, 400,
     "invalid_request_error", "limit"),
])
def test_messages_errors_have_anthropic_shape(server, body, status, kind, words):
    got, _, payload = server.request("POST", "/v1/messages", body)
    assert got == status, payload
    assert payload["type"] == "error" and payload["error"]["type"] == kind and words in payload["error"]["message"]


def test_messages_auth_with_x_api_key(server):
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=f"http://127.0.0.1:{server.port}", api_key="wrong", max_retries=0) \
            .messages.create(model=GENERATOR, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    status, _, payload = server.request("POST", "/v1/messages", {}, key=None)
    assert status == 401 and payload["error"]["type"] == "authentication_error"


# --- OpenAI's Responses API ----------------------------------------------------------------------------------

def test_responses_stream_and_not(server, oai):
    want = _openai_greedy(server, 12)
    r = oai.responses.create(model=GENERATOR, instructions=SYSTEM, input=USER, max_output_tokens=12, temperature=0,
                             store=False)
    assert r.output_text == want["choices"][0]["message"]["content"] and r.object == "response"
    assert r.usage.input_tokens == want["usage"]["prompt_tokens"]
    assert r.status == ("incomplete" if want["choices"][0]["finish_reason"] == "length" else "completed")
    items = oai.responses.create(model=GENERATOR, max_output_tokens=12, temperature=0, input=[
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": [{"type": "input_text", "text": USER}]}])
    assert items.output_text == r.output_text
    events = list(oai.responses.create(model=GENERATOR, instructions=SYSTEM, input=USER, max_output_tokens=12,
                                       temperature=0, stream=True))
    assert events[0].type == "response.created" and events[-1].type in ("response.completed",
                                                                        "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert events[-1].response.output_text == r.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_responses_structured_output(oai):
    schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 10}},
              "required": ["colour"], "additionalProperties": False}
    r = oai.responses.create(model=GENERATOR, input="Name a colour as JSON.", max_output_tokens=40, temperature=0,
                             text={"format": {"type": "json_schema", "name": "c", "schema": schema}})
    jsonschema.validate(json.loads(r.output_text), schema)


@pytest.mark.parametrize("extra, words", [({"previous_response_id": "resp_1"}, "keeps no responses"),
                                          ({"store": True}, "store"), ({"input": 3}, "input"),
                                          ({"tools": [{"type": "web_search"}]}, "built-in tools")])
def test_responses_refusals(server, extra, words):
    got, _, payload = server.request("POST", "/v1/responses", {"model": GENERATOR, "input": "hi", **extra})
    assert got == 400 and words in payload["error"]["message"], payload


# --- /tokenize, /detokenize, rerank --------------------------------------------------------------------------

def test_tokenize_detokenize_round_trip(server):
    text = "Hello, wörld! 123"
    status, _, body = server.request("POST", "/tokenize", {"model": GENERATOR, "content": text})
    assert status == 200 and len(body["tokens"]) > 3 and all(isinstance(i, int) for i in body["tokens"])
    status, _, back = server.request("POST", "/detokenize", {"model": GENERATOR, "tokens": body["tokens"]})
    assert status == 200 and back["content"] == text
    _, _, pieces = server.request("POST", "/tokenize", {"model": GENERATOR, "content": text, "with_pieces": True})
    assert [p["id"] for p in pieces["tokens"]] == body["tokens"] and "".join(p["piece"] for p in pieces["tokens"])
    for bad in ({"model": GENERATOR, "tokens": [10**9]}, {"model": GENERATOR, "tokens": "x"}):
        got, _, payload = server.request("POST", "/detokenize", bad)
        assert got == 400 and "tokens" in payload["error"]["message"]
    assert server.request("POST", "/tokenize", {"content": text})[0] == 400  # two models: which one?


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank"])
def test_rerank_orders_by_relevance(server, path):
    docs = ["Stock markets fell sharply on Monday.", "The kitten chased a ball of yarn.", "A recipe for bread."]
    status, _, body = server.request("POST", path, {"model": ENCODER, "query": "a young cat playing",
                                                    "documents": docs, "return_documents": True, "top_n": 2})
    assert status == 200, body
    results = body["results"]
    assert len(results) == 2 and results[0]["index"] == 1 and results[0]["document"]["text"] == docs[1]
    assert results[0]["relevance_score"] > results[1]["relevance_score"] and body["usage"]["total_tokens"] > 10
    _, _, plain = server.request("POST", path, {"query": "a young cat playing", "documents": docs})  # the encoder
    assert plain["results"][0]["index"] == 1 and "document" not in plain["results"][0]
    assert len(plain["results"]) == 3


@pytest.mark.parametrize("body, words", [({"model": GENERATOR, "query": "q", "documents": ["d"]}, "embedding model"),
                                         ({"model": ENCODER, "query": "q", "documents": []}, "documents"),
                                         ({"model": ENCODER, "query": "", "documents": ["d"]}, "query"),
                                         ({"model": ENCODER, "query": "q", "documents": ["d"], "top_n": 0}, "top_n")])
def test_rerank_errors(server, body, words):
    got, _, payload = server.request("POST", "/v1/rerank", body)
    assert got == 400 and words in payload["error"]["message"], payload


def test_metrics_count_every_api(server):
    """Run last: each API's requests are in the server's metrics under their own endpoint."""
    m = server.metrics()
    for endpoint in ("anthropic_messages", "anthropic_count_tokens", "responses", "tokenize"):
        assert m[f'corejax_requests_total{{endpoint="{endpoint}",model="{GENERATOR}",status="200"}}'] >= 1, endpoint
    assert m[f'corejax_requests_total{{endpoint="rerank",model="{ENCODER}",status="200"}}'] >= 3
    assert m[f'corejax_generation_tokens_total{{model="{GENERATOR}"}}'] > 50


_HOSTILE = (None, True, 0, -1, 2**63, 1e308, "", "x", "\udcff", [], ["x"], [[]], {"a": 1}, [{"type": "text"}],
            [{"role": "user"}], [{"role": "user", "content": [{"type": "tool_result", "content": 1}]}],
            [{"role": "assistant", "content": "", "tool_calls": [{"function": 1}]}], {"type": "json_schema"})
_BASES = [
    ("/v1/messages", {"model": GENERATOR, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
     ("model", "max_tokens", "messages", "system", "stop_sequences", "temperature", "top_p", "top_k", "stream",
      "tools", "tool_choice", "thinking", "output_config", "metadata")),
    ("/v1/messages/count_tokens", {"model": GENERATOR, "messages": [{"role": "user", "content": "hi"}]},
     ("model", "messages", "system", "tools")),
    ("/v1/responses", {"model": GENERATOR, "input": "hi", "max_output_tokens": 2},
     ("model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "text", "store",
      "previous_response_id", "reasoning", "tools")),
    ("/api/generate", {"model": GENERATOR, "prompt": "hi", "stream": False, "options": {"num_predict": 2}},
     ("model", "prompt", "system", "raw", "format", "options", "stream", "keep_alive", "images", "think")),
    ("/api/chat", {"model": GENERATOR, "messages": [{"role": "user", "content": "hi"}], "stream": False,
                   "options": {"num_predict": 2}}, ("model", "messages", "format", "options", "tools", "stream")),
    ("/api/embed", {"model": ENCODER, "input": "hi"}, ("model", "input", "truncate", "options", "dimensions")),
    ("/api/show", {"model": GENERATOR}, ("model", "name")),
    ("/api/pull", {"model": GENERATOR, "stream": False}, ("model", "name")),
    ("/tokenize", {"model": GENERATOR, "content": "hi"}, ("model", "content", "add_special", "with_pieces")),
    ("/detokenize", {"model": GENERATOR, "tokens": [1]}, ("model", "tokens")),
    ("/v1/rerank", {"model": ENCODER, "query": "q", "documents": ["d"]},
     ("model", "query", "documents", "top_n", "return_documents")),
]


def _shape_ok(path: str, payload) -> bool:
    if path.startswith("/api/"):
        return isinstance(payload, dict) and set(payload) == {"error"} and isinstance(payload["error"], str)
    if path.startswith("/v1/messages"):
        return isinstance(payload, dict) and payload.get("type") == "error" and payload["error"]["message"]
    return isinstance(payload, dict) and set(payload["error"]) == {"message", "type", "param", "code"}


def test_no_client_input_gets_a_500(server):
    """Each field of each new endpoint set to each value of a hostile list: a 2xx, or a 4xx in the API's own
    error shape, never a 5xx (options' values too: Ollama's options walk the same list)."""
    failures, sent = [], 0
    bases = _BASES + [("/api/generate", {"model": GENERATOR, "prompt": "hi", "stream": False,
                                         "options": {"num_predict": 2}}, ())]
    for path, base, fields in bases:
        cases = [(f, v) for f in fields for v in _HOSTILE]
        if not fields:  # the options object, option by option
            cases = [("options", {"num_predict": 2, name: v}) for name in ("temperature", "seed", "stop", "top_k",
                                                                          "repeat_last_n", "mirostat", "num_ctx")
                     for v in _HOSTILE]
        for field, value in cases:
            raw = json.dumps(dict(base, **{field: value})).encode()
            status, _, payload = server.request("POST", path, raw)
            sent += 1
            if status >= 500 or status >= 400 and not _shape_ok(path, payload):
                failures.append((path, raw[:140], status, str(payload)[:200]))
    assert sent > 1000 and not failures, failures[:10]


def _stream(server, path: str, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json",
                                                              "Authorization": f"Bearer {API_KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    return conn, resp


def test_a_client_leaving_any_stream_frees_its_generation(server):
    """An Ollama, an Anthropic and a Responses stream, each closed by its client after its first line: the
    generations end in the worker at once and the requests are logged as 499."""
    story = "Write a long story about a dragon."
    streams = [_stream(server, "/api/generate", {"model": GENERATOR, "prompt": story, "options": {"num_predict": 500}}),
               _stream(server, "/v1/messages", {"model": GENERATOR, "max_tokens": 500, "stream": True,
                                                "messages": [{"role": "user", "content": story}]}),
               _stream(server, "/v1/responses", {"model": GENERATOR, "input": story, "stream": True,
                                                 "max_output_tokens": 500})]
    for _, resp in streams:
        assert resp.readline().strip()
    assert server.metrics()[f'corejax_requests_in_flight{{model="{GENERATOR}"}}'] == 3
    for conn, _ in streams:
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()

    def idle() -> bool:
        m = server.metrics()
        return (m[f'corejax_requests_in_flight{{model="{GENERATOR}"}}'] == 0
                and m[f'corejax_requests_running{{model="{GENERATOR}"}}'] == 0
                and m[f'corejax_kv_cache_usage_ratio{{model="{GENERATOR}"}}'] == 0)

    deadline = time.monotonic() + 10  # 500 tokens each would take far longer on 2 cores
    while not idle():
        assert time.monotonic() < deadline, server.metrics()
        time.sleep(0.1)
    assert server.log_text().count('" 499 model=') >= 3


def test_a_failure_mid_stream_ends_each_stream_in_its_own_shape(server):
    """Run last (it kills the generator's worker; the next request starts a new one): an Ollama, an Anthropic and
    a Responses stream, each past its first text, end with their API's own error object."""
    story = "Write a long story about a dragon."
    streams = {
        "ollama": _stream(server, "/api/generate", {"model": GENERATOR, "prompt": story,
                                                     "options": {"num_predict": 500}}),
        "anthropic": _stream(server, "/v1/messages", {"model": GENERATOR, "max_tokens": 500, "stream": True,
                                                      "messages": [{"role": "user", "content": story}]}),
        "responses": _stream(server, "/v1/responses", {"model": GENERATOR, "input": story, "stream": True,
                                                       "max_output_tokens": 500}),
    }
    firsts = {"ollama": b'"response"', "anthropic": b"content_block_delta", "responses": b"output_text.delta"}
    for name, (_, resp) in streams.items():
        while firsts[name] not in (line := resp.readline()):
            assert line, name
    victim = next(p for p in server.worker_pids() if f"--model {GENERATOR}" in Path(f"/proc/{p}/cmdline")
                  .read_bytes().replace(b"\0", b" ").decode())
    os.kill(victim, signal.SIGKILL)
    tails = {name: resp.read().decode().strip() for name, (_, resp) in streams.items()}
    for conn, _ in streams.values():
        conn.close()
    last = json.loads(tails["ollama"].splitlines()[-1])
    assert set(last) == {"error"} and last["error"], tails["ollama"][-300:]
    kind, data = tails["anthropic"].split("\n\n")[-1].split("\n")
    assert kind == "event: error" and json.loads(data[len("data: "):])["type"] == "error"
    kind, data = tails["responses"].split("\n\n")[-1].split("\n")
    failed = json.loads(data[len("data: "):])
    assert kind == "event: response.failed" and failed["response"]["status"] == "failed"
    assert failed["response"]["error"]["message"]
    r = server.request("POST", "/api/generate", {"model": GENERATOR, "prompt": "hi", "stream": False,
                                                 "options": {"num_predict": 2}})
    assert r[0] == 200 and r[2]["done"]  # a new worker answers


# --- tool calls through the translations (the chat path's tools: corejax/tools/) -------------------------------

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
           "additionalProperties": False}


def test_messages_tool_use_and_result_round_trip(claude):
    tools = [{"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER}]
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    m = claude.messages.create(model=GENERATOR, max_tokens=60, **GREEDY, tools=tools, messages=ask,
                               tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True})
    uses = [b for b in m.content if b.type == "tool_use"]
    assert m.stop_reason == "tool_use" and len(uses) == 1 and uses[0].name == "get_weather", m
    jsonschema.validate(uses[0].input, WEATHER)
    with claude.messages.stream(model=GENERATOR, max_tokens=60, **GREEDY, tools=tools, messages=ask,
                                tool_choice={"type": "any", "disable_parallel_tool_use": True}) as stream:
        final = stream.get_final_message()
    streamed = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use" and [b.input for b in streamed] == [uses[0].input]
    back = claude.messages.create(model=GENERATOR, max_tokens=8, **GREEDY, tools=tools, messages=[
        *ask, {"role": "assistant", "content": [u.model_dump() for u in uses]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "Sunny, 21 C"}]}])
    assert back.stop_reason in ("end_turn", "max_tokens") and back.content and back.content[0].type == "text"


def test_responses_function_call_round_trip(oai):
    tools = [{"type": "function", "name": "get_weather", "description": "The weather in a city",
              "parameters": WEATHER}]
    r = oai.responses.create(model=GENERATOR, input="What is the weather in Paris?", max_output_tokens=60,
                             temperature=0, tools=tools, tool_choice="required", parallel_tool_calls=False)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather", r.output
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)
    back = oai.responses.create(model=GENERATOR, max_output_tokens=8, temperature=0, tools=tools, input=[
        {"role": "user", "content": "What is the weather in Paris?"}, calls[0].model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny, 21 C"}])
    assert back.output_text


def test_models_list_reads_in_both_clients(claude, oai):
    """One /v1/models listing in OpenAI's and Anthropic's shapes, so either client's models.list() works."""
    anthropic_ids = [m.id for m in claude.models.list()]
    assert GENERATOR in anthropic_ids and anthropic_ids == [m.id for m in oai.models.list()]
    info = claude.models.retrieve(GENERATOR)
    assert info.type == "model" and info.display_name == GENERATOR and info.created_at.year >= 2026
