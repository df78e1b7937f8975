"""`corejax serve` as users meet it: a real server process on a free loopback port, sandboxed workers, driven by
the real `openai` package (sync and async, streaming and not) and by raw HTTP for the error cases."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from references import require  # noqa: E402

openai = require("openai")  # a test dependency (pyproject [test]); the server itself needs none

API_KEY = "test-key"
GENERATOR, ENCODER = "smollm2-135m-instruct", "all-minilm-l6-v2"
START_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`corejax serve ...` in a subprocess; its log in a file the failure message shows."""

    def __init__(self, tmp: Path, *args: str, warmup: str = "first"):
        """warmup: `--warmup`; "first" (only a first request's programs) keeps the suite's many starts short, and
        the module's main server runs the default, "batches"."""
        self.port = _free_port()
        self.log = tmp / f"serve-{self.port}.log"
        cmd = [sys.executable, "-c", "from corejax.cli import main; raise SystemExit(main())", "serve",
               "--port", str(self.port), "--warmup", warmup, *args]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server exited at start:\n{self.log_text()}"
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise AssertionError(f"the server did not start in {START_TIMEOUT_S} s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def request(self, method: str, path: str, body: bytes | dict | None = None, *, key: str | None = API_KEY,
                headers: dict | None = None) -> tuple[int, dict, dict | str]:
        """(status, headers, JSON body or text) of one raw HTTP request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            h = {"Content-Type": "application/json", **(headers or {})}
            if key is not None:
                h["Authorization"] = f"Bearer {key}"
            data = json.dumps(body).encode() if isinstance(body, dict) else body
            conn.request(method, path, body=data, headers=h)
            resp = conn.getresponse()
            text = resp.read().decode()
            try:
                payload = json.loads(text)
            except ValueError:
                payload = text
            return resp.status, dict(resp.getheaders()), payload
        finally:
            conn.close()

    def metrics(self) -> dict[str, float]:
        status, _, text = self.request("GET", "/metrics")
        assert status == 200
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def worker_pids(self) -> list[int]:
        pids = []
        for children in Path(f"/proc/{self.proc.pid}/task").glob("*/children"):
            pids += [int(p) for p in children.read_text().split()]
        return pids

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_gguf):
    s = ServerProcess(tmp_path_factory.mktemp("serve"), "-m", GENERATOR, "-m", ENCODER, "--api-key", API_KEY,
                      "--max-queue", "3", "--max-body", str(256 << 10), "--max-tokens", "2048", warmup="batches")
    yield s
    assert s.stop() == 0, s.log_text()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    """Session.generate on the same model: what the server's greedy text must equal."""
    from corejax import Session

    with Session(GENERATOR, progress=False) as s:
        yield s


CHAT = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a primary colour."}]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [GENERATOR, ENCODER]
    assert client.models.retrieve(ENCODER).id == ENCODER
    status, _, body = server.request("GET", "/health", key=None)
    assert (status, body["status"]) == (200, "ok")


def test_chat_greedy_equals_session(client, reference):
    r = client.chat.completions.create(model=GENERATOR, messages=CHAT, max_tokens=12, temperature=0)
    want = reference.generate(messages=CHAT, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert choice.message.content == want.text and choice.message.role == "assistant"
    assert choice.finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(want.prompt_tokens)
    assert r.usage.completion_tokens == len(want.tokens)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.system_fingerprint
    assert abs(r.created - time.time()) < 600


def test_completion_stream_equals_whole(client, reference):
    prompt = "The three largest planets are"
    whole = client.completions.create(model=GENERATOR, prompt=prompt, max_tokens=16, temperature=0)
    assert whole.choices[0].text == reference.generate(prompt, max_tokens=16, temperature=0).text
    chunks = list(client.completions.create(model=GENERATOR, prompt=prompt, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "text_completion"


def test_async_chat_stream(server, reference):
    async def run():
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0) as aclient:
            stream = await aclient.chat.completions.create(model=GENERATOR, messages=CHAT, max_tokens=12,
                                                           temperature=0, stream=True)
            return [c async for c in stream]

    chunks = asyncio.run(run())
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == reference.generate(messages=CHAT, max_tokens=12, temperature=0).text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[0].object == "chat.completion.chunk"


def test_n_choices_with_a_seed_are_reproducible(client):
    kw = dict(model=GENERATOR, messages=CHAT, max_tokens=16, temperature=1.0, top_p=1.0, seed=1234, n=2)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1]
    assert texts == [c.message.content for c in b.choices]
    assert texts[0] != texts[1]  # seed, seed + 1: two different samples
    assert 2 <= a.usage.completion_tokens <= 32  # both choices' tokens; the prompt counted once
    streamed = client.chat.completions.create(**kw, stream=True)
    parts = ["", ""]
    for c in streamed:
        for ch in c.choices:
            parts[ch.index] += ch.delta.content or ""
    assert parts == texts


def test_logprobs(client):
    r = client.chat.completions.create(model=GENERATOR, messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token or entry.bytes
    c = client.completions.create(model=GENERATOR, prompt="One, two,", max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == c.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]


def test_sampling_extras_and_stop(client, reference):
    r = client.completions.create(model=GENERATOR, prompt="Count: 1, 2, 3,", max_tokens=20, temperature=0,
                                  stop=[" 6"], presence_penalty=0.0, frequency_penalty=0.0,
                                  extra_body={"top_k": 20, "min_p": 0.1, "repetition_penalty": 1.0})
    want = reference.generate("Count: 1, 2, 3,", max_tokens=20, temperature=0, stop=[" 6"])
    assert r.choices[0].text == want.text and " 6" not in r.choices[0].text
    assert r.choices[0].finish_reason == "stop"


def test_structured_output(client, server):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=GENERATOR, max_tokens=60, temperature=0,
        messages=[{"role": "user", "content": "Describe Alice, 30, as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}})
    value = json.loads(r.choices[0].message.content)
    jsonschema.validate(value, schema)
    assert r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=GENERATOR, prompt="The year is", max_tokens=10, temperature=0,
                                  extra_body={"guided_regex": " [0-9]{4}"})
    assert re.fullmatch(" [0-9]{4}", r.choices[0].text)
    got, _, payload = server.request("POST", "/v1/chat/completions", {
        "model": GENERATOR, "messages": CHAT, "response_format": {"type": "json_object"}, "max_tokens": 40})
    assert got == 200 and payload["choices"][0]["message"]["content"].startswith("{")


def test_embeddings(client):
    r = client.embeddings.create(model=ENCODER, input=["a cat", "a kitten", "stock markets"])
    vecs = [d.embedding for d in r.data]
    assert len(vecs) == 3 and len(vecs[0]) == 384
    dot = [sum(a * b for a, b in zip(vecs[0], v)) for v in vecs[1:]]
    assert dot[0] > dot[1]  # normalised sentence embeddings: the kitten is nearer than the markets
    assert r.usage.prompt_tokens > 3
    b64 = client.embeddings.create(model=ENCODER, input="a cat", encoding_format="base64")
    decoded = np.frombuffer(base64.b64decode(b64.data[0].embedding), "<f4")  # little-endian float32, as OpenAI
    assert decoded.tolist() == pytest.approx(vecs[0], abs=1e-6)


@pytest.mark.parametrize("path, body, status, code", [
    ("/v1/chat/completions", {"model": "nope", "messages": CHAT}, 404, "model_not_found"),
    ("/v1/chat/completions", {"model": GENERATOR, "messages": CHAT, "temperature": -1}, 400, None),
    ("/v1/chat/completions", {"model": GENERATOR, "messages": "hi"}, 400, None),
    ("/v1/chat/completions", {"model": GENERATOR, "messages": CHAT, "tools": [{"type": "function"}]}, 400, None),
    ("/v1/chat/completions", {"model": GENERATOR, "messages": CHAT, "max_tokens": 100000}, 400, None),
    ("/v1/chat/completions", {"model": ENCODER, "messages": CHAT}, 400, None),
    ("/v1/completions", {"model": GENERATOR, "prompt": "hello " * 9000}, 400, "context_length_exceeded"),
    ("/v1/completions", {"model": GENERATOR, "prompt": [1, 2, 3]}, 400, None),
    ("/v1/embeddings", {"model": GENERATOR, "input": "x"}, 400, None),
    ("/v1/chat/completions", {"model": GENERATOR, "messages": CHAT, "response_format": {"type": "json_schema",
                              "json_schema": {"name": "x", "schema": {"type": "objec"}}}}, 400, None),
    ("/v1/completions", {"model": GENERATOR, "prompt": "x", "guided_regex": "[0-9"}, 400, None),
    ("/v1/nothing", {}, 404, "not_found"),
])
def test_errors_have_openai_shape_and_status(server, path, body, status, code):
    got, _, payload = server.request("POST", path, body)
    assert got == status, payload
    assert set(payload["error"]) == {"message", "type", "param", "code"} and payload["error"]["message"]
    if code is not None:
        assert payload["error"]["code"] == code


def test_bad_json_auth_and_body_limit(server):
    assert server.request("POST", "/v1/completions", b"{not json")[0] == 400
    status, _, payload = server.request("GET", "/v1/models", key=None)
    assert status == 401 and payload["error"]["code"] == "invalid_api_key"
    assert server.request("GET", "/v1/models", key="wrong")[0] == 401
    status, _, payload = server.request("POST", "/v1/completions", b'{"prompt": "' + b"x" * (300 << 10) + b'"}')
    assert status == 413 and "limit" in payload["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).models.list()


def test_hostile_bodies_get_400_or_413(server):
    """A 64 MiB body gets its 413 with an error body (not a reset), deep nesting, NaN and unpaired surrogates
    a 400 naming the problem (they were a reset, a 500 RecursionError and a 500 UnicodeEncodeError)."""
    import socket

    big = b'{"model": "' + GENERATOR.encode() + b'", "prompt": "' + b"x" * (64 << 20) + b'"}'
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(big) + big)
        reply = b""
        while b"limit" not in reply and len(reply) < 8192 and (part := s.recv(4096)):
            reply += part
    assert reply.startswith(b"HTTP/1.1 413") and b"limit" in reply, reply[:300]
    cases = [(b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
             (b'{"prompt": "hi", "x": ' + b"{\"a\": " * 70 + b"1" + b"}" * 70 + b"}", "nested too deeply"),
             (b'{"prompt": "hi", "temperature": NaN}', "not a JSON number"),
             (b'{"prompt": "\\ud800 hi"}', "surrogate"), (b'{"prompt": "hi", "stop": ["\\udfff"]}', "surrogate")]
    for raw, words in cases:
        status, _, payload = server.request("POST", "/v1/completions", raw)
        assert status == 400 and words in payload["error"]["message"], (raw[:60], payload)


_WALK_FIELDS = ("model", "prompt", "messages", "input", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                "top_k", "min_p", "n", "seed", "stop", "stream", "stream_options", "logprobs", "top_logprobs", "echo",
                "suffix", "logit_bias", "frequency_penalty", "presence_penalty", "repetition_penalty",
                "response_format", "tools", "tool_choice", "parallel_tool_calls", "user", "ignore_eos", "guided_json", "guided_regex", "guided_choice",
                "encoding_format", "dimensions")
_WALK_VALUES = (None, True, 0, -1, 1, 2**63, 1e308, -0.5, "", "x", "\udcff", [], ["x"], [[]], {"a": 1},
                {"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": {"a": {"$ref": "#"}}}}},
                [{"role": "user"}], [{"role": "user", "content": [{"type": "image_url"}]}], [{"content": 1}])
_WALK_RAW = (b"Infinity", b"1e999", b"123456789012345678901234567890", b'"\\ud800"')


def test_no_client_input_gets_a_500(server):
    """Every field of every generation and embedding endpoint, set to each value of a hostile list (wrong types,
    huge numbers, empty and nested values, lone surrogates, recursive schemas, raw JSON the encoder cannot write):
    the answer is a 2xx or an OpenAI-shaped 4xx, never a 5xx. Found 500s for lone surrogates (prompt, stop,
    guided_regex, input), a 30-digit top_k, a non-string embeddings model, and a 503 worker failure for logprobs
    with no alternatives (completions logprobs=0, chat logprobs=true)."""
    bases = [("/v1/completions", {"model": GENERATOR, "prompt": "hi", "max_tokens": 2}),
             ("/v1/chat/completions", {"model": GENERATOR, "messages": [{"role": "user", "content": "hi"}],
                                       "max_tokens": 2}),
             ("/v1/embeddings", {"model": ENCODER, "input": "hi"})]
    failures, sent = [], 0
    for path, base in bases:
        for field in _WALK_FIELDS:
            bodies = []
            for value in _WALK_VALUES:
                body = dict(base)
                body[field] = value
                bodies.append(json.dumps(body).encode())
            bodies += [json.dumps(base).encode()[:-1] + b', "' + field.encode() + b'": ' + raw + b"}"
                       for raw in _WALK_RAW]
            for raw in bodies:
                status, _, payload = server.request("POST", path, raw)
                sent += 1
                if status >= 500 or status >= 400 and set(payload["error"]) != {"message", "type", "param", "code"}:
                    failures.append((path, raw[:120], status, str(payload)[:200]))
    assert sent > 2000 and not failures, failures[:10]


def _open_stream(server, max_tokens: int = 1500) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """A long streaming completion, read as raw server-sent events."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    body = {"model": GENERATOR, "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    return conn, resp


def _events(resp: http.client.HTTPResponse, n: int) -> list[bytes]:
    return [line for line in (resp.readline() for _ in range(2 * n)) if line.strip()]


def _wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_disconnect_frees_pages_and_queue_limit(server):
    """Three long streams hold the model's three in-flight places (--max-queue 3): a fourth request gets 429
    with Retry-After. Closing the connections cancels the generations in the worker: its KV pages are free
    again at once, long before the 1500 tokens each stream asked for."""
    streams = [_open_stream(server) for _ in range(3)]
    for _, resp in streams:
        assert all(e.startswith(b"data: {") for e in _events(resp, 3))
    m = server.metrics()
    assert m[f'corejax_kv_cache_usage_ratio{{model="{GENERATOR}"}}'] > 0
    assert m[f'corejax_requests_in_flight{{model="{GENERATOR}"}}'] == 3
    status, headers, payload = server.request("POST", "/v1/completions", {"model": GENERATOR, "prompt": "x"})
    assert status == 429 and headers.get("retry-after") == "1" and payload["error"]["type"] == "rate_limit_exceeded"
    start = time.monotonic()
    for conn, _ in streams:
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()

    def idle() -> bool:
        m = server.metrics()
        return (m[f'corejax_kv_cache_usage_ratio{{model="{GENERATOR}"}}'] == 0
                and m[f'corejax_requests_running{{model="{GENERATOR}"}}'] == 0
                and m[f'corejax_requests_in_flight{{model="{GENERATOR}"}}'] == 0)

    assert _wait_for(idle, 20), server.metrics()
    assert time.monotonic() - start < 20  # 1500 tokens each would take far longer on 2 cores
    assert server.request("POST", "/v1/completions", {"model": GENERATOR, "prompt": "x", "max_tokens": 2})[0] == 200

    # A request without stream: the server notices the closed connection while it waits, and cancels too.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", "/v1/completions", headers={"Content-Type": "application/json",
                                                     "Authorization": f"Bearer {API_KEY}"},
                 body=json.dumps({"model": GENERATOR, "prompt": "Once", "max_tokens": 1500, "ignore_eos": True}))
    assert _wait_for(lambda: server.metrics()[f'corejax_requests_running{{model="{GENERATOR}"}}'] == 1, 30)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert _wait_for(idle, 20), server.metrics()


def test_worker_crash_is_503_and_the_server_keeps_serving(server, client):
    pids_before = server.worker_pids()
    result: dict = {}

    def long_request():
        result["status"], _, result["payload"] = server.request(
            "POST", "/v1/completions", {"model": GENERATOR, "prompt": "Once", "max_tokens": 1500,
                                        "ignore_eos": True, "temperature": 0})

    t = threading.Thread(target=long_request)
    t.start()
    assert _wait_for(lambda: server.metrics()[f'corejax_requests_running{{model="{GENERATOR}"}}'] == 1, 30)
    victim = next(p for p in pids_before if f"--model {GENERATOR}" in Path(f"/proc/{p}/cmdline").read_bytes()
                  .replace(b"\0", b" ").decode())
    os.kill(victim, signal.SIGKILL)
    t.join(60)
    assert result["status"] == 503, result
    assert result["payload"]["error"]["code"] == "worker_crashed"
    r = client.completions.create(model=GENERATOR, prompt="The capital of France is", max_tokens=3, temperature=0)
    assert r.choices[0].text.strip()  # a new worker answered
    assert victim not in server.worker_pids()


def test_metrics_and_access_log(server, client):
    client.completions.create(model=GENERATOR, prompt="Hi", max_tokens=2, temperature=0)
    m = server.metrics()
    assert m[f'corejax_requests_total{{endpoint="completions",model="{GENERATOR}",status="200"}}'] >= 1
    assert m[f'corejax_generation_tokens_total{{model="{GENERATOR}"}}'] >= 2
    assert m[f'corejax_time_to_first_token_seconds_count{{model="{GENERATOR}"}}'] >= 1
    assert f'"POST /v1/completions" 200 model={GENERATOR}' in server.log_text()


def test_blocklist_and_graceful_shutdown(tmp_path, smollm2_gguf):
    """A server with --blocklist ends a matching generation with content_filter; SIGTERM lets a running stream
    run for the grace, then ends it with a final error event and [DONE], and the process exits 0."""
    (tmp_path / "block.txt").write_text("# blocked\nPARIS\n")
    s = ServerProcess(tmp_path, "-m", GENERATOR, "--blocklist", str(tmp_path / "block.txt"),
                      "--shutdown-grace", "2")
    try:
        c = openai.OpenAI(base_url=s.base_url, api_key="none", max_retries=0)
        r = c.completions.create(model=GENERATOR, prompt="The capital of France is", max_tokens=12, temperature=0)
        assert r.choices[0].finish_reason == "content_filter"
        assert "paris" not in r.choices[0].text.lower()
        _, resp = _open_stream(s)
        _events(resp, 2)
        start = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        tail = resp.read().decode().strip().split("\n\n")
        assert tail[-1] == "data: [DONE]"
        assert json.loads(tail[-2][len("data: "):])["error"]["code"] == "server_shutdown"
        assert s.proc.wait(30) == 0
        assert 1.5 < time.monotonic() - start < 30
    finally:
        s.stop()
