"""Ollama's native API on `corejax serve` (corejax/server/ollama.py, ollama_models.py), driven by the real
`ollama` package over loopback HTTP against a real server process, and by raw HTTP for the error cases."""

from __future__ import annotations

import json

import jsonschema
import pytest
from references import require
from test_server import API_KEY, ENCODER, GENERATOR, ServerProcess

ollama = require("ollama")  # a test dependency (pyproject [test])

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a primary colour."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_gguf):
    s = ServerProcess(tmp_path_factory.mktemp("serve"), "-m", GENERATOR, "-m", ENCODER, "--api-key", API_KEY,
                      "--max-tokens", "512")
    yield s
    assert s.stop() == 0, s.log_text()


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=f"http://127.0.0.1:{server.port}", headers=AUTH)


def _openai_greedy(server, messages, max_tokens) -> dict:
    status, _, body = server.request("POST", "/v1/chat/completions", {
        "model": GENERATOR, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
    assert status == 200, body
    return body


def test_chat_stream_and_not_equal_the_openai_path(server, client):
    want = _openai_greedy(server, CHAT, 12)
    r = client.chat(GENERATOR, messages=CHAT, options={"temperature": 0, "num_predict": 12})
    assert r.message.role == "assistant" and r.message.content == want["choices"][0]["message"]["content"]
    assert r.done and r.done_reason == {"stop": "stop", "length": "length"}[want["choices"][0]["finish_reason"]]
    assert r.prompt_eval_count == want["usage"]["prompt_tokens"]
    assert r.eval_count == want["usage"]["completion_tokens"]
    assert r.total_duration >= r.prompt_eval_duration > 0 and r.eval_duration >= 0 and r.created_at
    parts = list(client.chat(GENERATOR, messages=CHAT, options={"temperature": 0, "num_predict": 12}, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert len(parts) > 2 and "".join(p.message.content for p in parts) == r.message.content
    assert parts[-1].eval_count == r.eval_count and parts[-1].done_reason == r.done_reason


def test_generate_applies_the_template_and_raw_does_not(server, client):
    want = _openai_greedy(server, [{"role": "system", "content": "You are brief."},
                                   {"role": "user", "content": "Name a primary colour."}], 10)
    r = client.generate(GENERATOR, "Name a primary colour.", system="You are brief.",
                        options={"temperature": 0, "num_predict": 10})
    assert r.response == want["choices"][0]["message"]["content"]
    text = "".join(p.response for p in client.generate(GENERATOR, "Name a primary colour.", system="You are brief.",
                                                       options={"temperature": 0, "num_predict": 10}, stream=True))
    assert text == r.response
    status, _, raw = server.request("POST", "/v1/completions", {"model": GENERATOR, "prompt": "The sky is",
                                                                "max_tokens": 8, "temperature": 0})
    assert status == 200
    r = client.generate(GENERATOR, "The sky is", raw=True, options={"temperature": 0, "num_predict": 8})
    assert r.response == raw["choices"][0]["text"] and r.eval_count == 8 and r.done_reason == "length"
    loaded = client.generate(GENERATOR, "", keep_alive="5m")  # Ollama's way to load a model
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    assert client.chat(GENERATOR, messages=[], keep_alive=0).done_reason == "unload"  # answered; still loaded
    assert client.generate(GENERATOR, "hi", options={"num_predict": 1}).eval_count == 1


def test_options_seed_num_predict_and_stop(client):
    def sample(seed: int) -> str:
        return client.generate(GENERATOR, "Write a word.", options={"temperature": 1.0, "top_p": 1.0, "top_k": 0,
                                                                    "min_p": 0.0, "seed": seed, "num_predict": 12,
                                                                    "num_thread": 1}).response
    assert sample(1) == sample(1)
    assert len({sample(1), sample(2), sample(3)}) > 1
    r = client.generate(GENERATOR, "Once upon a time", raw=True, options={"num_predict": 5, "temperature": 0})
    assert r.eval_count == 5 and r.done_reason == "length"
    base = client.generate(GENERATOR, "Count: 1, 2, 3,", raw=True, options={"temperature": 0, "num_predict": 20})
    assert " 6" in base.response  # so the stop below has something to cut
    r = client.generate(GENERATOR, "Count: 1, 2, 3,", raw=True,
                        options={"temperature": 0, "num_predict": 20, "stop": [" 6"], "repeat_penalty": 1.0})
    assert r.done_reason == "stop" and " 6" not in r.response
    assert base.response.startswith(r.response)


def test_logprobs(client):
    r = client.chat(GENERATOR, messages=CHAT, logprobs=True, top_logprobs=3, options={"temperature": 0,
                                                                                     "num_predict": 6})
    assert len(r.logprobs) == r.eval_count
    for entry in r.logprobs:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token  # greedy: the best
    streamed = [lp for p in client.chat(GENERATOR, messages=CHAT, logprobs=True, stream=True,
                                        options={"temperature": 0, "num_predict": 6}) for lp in p.logprobs or []]
    assert [e.token for e in streamed] == [e.token for e in r.logprobs]
    raw = client.generate(GENERATOR, "One, two,", raw=True, logprobs=True, top_logprobs=2,
                          options={"temperature": 0, "num_predict": 4})
    assert "".join(e.token for e in raw.logprobs) == raw.response and len(raw.logprobs[0].top_logprobs) == 2


@pytest.mark.parametrize("opts, words", [({"mirostat": 2}, "mirostat"), ({"typical_p": 0.5}, "typical_p"),
                                          ({"repeat_penalty": 1.3, "repeat_last_n": 64}, "repeat_last_n"),
                                          ({"frobnicate": 1}, "frobnicate"), ({"num_predict": "x"}, "num_predict"),
                                          ({"temperature": -1}, "temperature")])
def test_options_that_cannot_be_honoured_are_refused(client, opts, words):
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(GENERATOR, "hi", options=opts)
    assert e.value.status_code == 400 and words in e.value.error


def test_format_json_and_schema(client):
    r = client.chat(GENERATOR, messages=[{"role": "user", "content": "Reply with the JSON {\"colour\": \"red\"}."}],
                    format="json", options={"temperature": 0, "num_predict": 100})
    assert r.done_reason == "stop" and isinstance(json.loads(r.message.content), dict)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client.generate(GENERATOR, "Describe Alice, 30, as JSON.", format=schema,
                        options={"temperature": 0, "num_predict": 60})
    jsonschema.validate(json.loads(r.response), schema)


def test_embed_and_legacy_embeddings(client):
    r = client.embed(ENCODER, ["a cat", "a kitten", "stock markets"])
    vecs = r.embeddings
    assert len(vecs) == 3 and len(vecs[0]) == 384 and r.prompt_eval_count > 3
    dot = [sum(a * b for a, b in zip(vecs[0], v)) for v in vecs[1:]]
    assert dot[0] > dot[1]
    legacy = client.embeddings(ENCODER, "a cat")
    assert legacy.embedding == pytest.approx(vecs[0], abs=1e-6)


def test_tags_show_ps_version(server, client):
    tags = client.list().models
    assert [m.model for m in tags] == [GENERATOR, ENCODER]
    assert tags[0].size > 10 << 20 and tags[0].details.format == "gguf" and len(tags[0].digest) == 64
    show = client.show(GENERATOR)
    assert show.capabilities == ["completion"] and client.show(ENCODER).capabilities == ["embedding"]
    assert any(k.endswith(".context_length") and v >= 2048 for k, v in show.modelinfo.items())
    ps = client.ps().models
    assert {m.model for m in ps} == {GENERATOR, ENCODER} and ps[0].context_length >= 2048
    status, _, body = server.request("GET", "/api/version")
    assert status == 200 and body["version"]


def test_pull_of_a_cached_model_streams_progress(client):
    lines = list(client.pull(GENERATOR, stream=True))
    assert lines[0].status == "pulling manifest" and lines[-1].status == "success"
    layer = [p for p in lines if p.digest]
    assert layer and layer[-1].completed == layer[-1].total > 10 << 20
    assert client.pull(GENERATOR).status == "success"
    with pytest.raises(ollama.ResponseError) as e:
        client.pull("no-such-model")
    assert e.value.status_code == 404 and "registry" in e.value.error


@pytest.mark.parametrize("method, path, body, status, words", [
    ("POST", "/api/chat", {"model": "nope", "messages": CHAT}, 404, "is not served here"),
    ("POST", "/api/chat", {"model": GENERATOR, "messages": CHAT, "stream": False,
                           "tools": [{"type": "function", "function": {"parameters": {}}}]}, 400, "tools"),
    ("POST", "/api/chat", {"model": GENERATOR, "messages": "hi", "stream": False}, 400, "messages"),
    ("POST", "/api/generate", {"model": GENERATOR, "prompt": "hi", "images": ["aGk="]}, 400, "images"),
    ("POST", "/api/generate", {"model": GENERATOR, "prompt": "hi", "format": "yaml"}, 400, "format"),
    ("POST", "/api/generate", {"prompt": "hi"}, 400, "model"),
    ("POST", "/api/embed", {"model": GENERATOR, "input": "x"}, 400, "embed"),
    ("POST", "/api/embed", {"model": ENCODER, "input": []}, 400, "input"),
    ("POST", "/api/generate", b"{not json", 400, "JSON"),
    ("POST", "/api/nothing", {}, 404, "no route"),
    ("POST", "/api/tags", {}, 405, "not allowed"),
])
def test_errors_have_ollama_shape(server, method, path, body, status, words):
    got, _, payload = server.request(method, path, body)
    assert got == status, payload
    assert set(payload) == {"error"} and words in payload["error"], payload


def test_auth_is_the_servers(server):
    status, _, payload = server.request("GET", "/api/tags", key=None)
    assert status == 401 and set(payload) == {"error"} and "API key" in payload["error"]
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=f"http://127.0.0.1:{server.port}").list()
    assert e.value.status_code == 401
    assert server.request("GET", "/api/tags", key=None, headers={"x-api-key": API_KEY})[0] == 200


def test_metrics_and_access_log(server, client):
    """Run last: the Ollama endpoints count in the server's metrics and access log as /v1's do."""
    client.chat(GENERATOR, messages=CHAT, options={"num_predict": 2})
    m = server.metrics()
    assert m[f'corejax_requests_total{{endpoint="ollama_chat",model="{GENERATOR}",status="200"}}'] >= 3
    assert m[f'corejax_requests_total{{endpoint="ollama_pull",model="{GENERATOR}",status="200"}}'] >= 2
    assert m[f'corejax_request_duration_seconds_count{{endpoint="ollama_generate",model="{GENERATOR}"}}'] >= 3
    log = server.log_text()
    assert f'"POST /api/chat" 200 model={GENERATOR}' in log and f'"POST /api/pull" 200 model={GENERATOR}' in log


def test_chat_with_tools_and_a_tool_result(client):
    """Ollama has no tool_choice: the tools reach the template (SmolLM2's knows none: the generic system message)
    and whatever the model answers comes back as content or tool_calls; a tool result goes back through."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string"}}, "required": ["city"]}}}]
    r = client.chat(GENERATOR, messages=CHAT, tools=tools, options={"temperature": 0, "num_predict": 24})
    assert r.done and (r.message.content or r.message.tool_calls)
    call = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    back = client.chat(GENERATOR, tools=tools, options={"temperature": 0, "num_predict": 6}, messages=[
        *CHAT, {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "Sunny, 21 C", "tool_name": "get_weather"}])
    assert back.done and back.message.content
