"""`corejax serve` with models loaded on demand (corejax/server/models.py): an allow-list, --max-models,
keep_alive, /v1/models' status, over real HTTP with the real `openai` client; each model a sandboxed worker."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from references import require
from test_server import API_KEY, ENCODER, GENERATOR, ServerProcess
from test_server import _wait_for as _wait

openai = require("openai")
TOO_BIG = "gemma3-270m"  # needs about 1.0 GiB of budget: over --memory-limit 1000MiB, where the others fit


@pytest.fixture(scope="module")
def pool_server(tmp_path_factory, smollm2_gguf, gemma3_gguf):
    """Nothing preloaded; three models allowed, one loaded at a time."""
    s = ServerProcess(tmp_path_factory.mktemp("serve-pool"), "--allow-model", GENERATOR, "--allow-model", ENCODER,
                      "--allow-model", TOO_BIG, "--max-models", "1", "--memory-limit", "1000MiB",
                      "--api-key", API_KEY)
    yield s
    assert s.stop() == 0, s.log_text()


@pytest.fixture(scope="module")
def client(pool_server):
    return openai.OpenAI(base_url=pool_server.base_url, api_key=API_KEY, max_retries=0)


def _status(server) -> dict[str, str]:
    status, _, body = server.request("GET", "/v1/models")
    assert status == 200, body
    return {m["id"]: m["status"]["value"] for m in body["data"]}


def test_load_on_demand_and_lru_eviction(pool_server, client):
    assert _status(pool_server) == {GENERATOR: "unloaded", ENCODER: "unloaded", TOO_BIG: "unloaded"}
    r = client.completions.create(model=GENERATOR, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert r.choices[0].text.strip().startswith("Paris")
    assert _status(pool_server)[GENERATOR] == "loaded"
    e = client.embeddings.create(model=ENCODER, input=["a cat", "a kitten", "stock markets"])
    vecs = [d.embedding for d in e.data]
    assert len(vecs[0]) == 384
    dot = [sum(a * b for a, b in zip(vecs[0], v)) for v in vecs[1:]]
    assert dot[0] > dot[1]
    assert _status(pool_server) == {GENERATOR: "unloaded", ENCODER: "loaded", TOO_BIG: "unloaded"}  # evicted
    again = client.completions.create(model=GENERATOR, prompt="The capital of France is", max_tokens=4,
                                      temperature=0)
    assert again.choices[0].text == r.choices[0].text  # reloaded, same greedy text
    assert _status(pool_server)[ENCODER] == "unloaded"
    _, _, body = pool_server.request("GET", "/v1/models")
    card = next(m for m in body["data"] if m["id"] == GENERATOR)
    assert card["status"]["size_bytes"] > 100 << 20  # the worker's reserved bytes (ModelPool.ps)
    assert card["status"]["expires_at"] == pytest.approx(time.time() + 300, abs=60)  # --keep-alive's 5m default


def test_keep_alive(pool_server, client):
    client.completions.create(model=GENERATOR, prompt="Hi", max_tokens=1, extra_body={"keep_alive": "1s"})
    assert _status(pool_server)[GENERATOR] == "loaded"
    assert _wait(lambda: _status(pool_server)[GENERATOR] == "unloaded", 10)  # unloaded after its second
    client.completions.create(model=GENERATOR, prompt="Hi", max_tokens=1, extra_body={"keep_alive": 0})
    assert _status(pool_server)[GENERATOR] == "unloaded"  # 0: unloaded as the request ended
    client.completions.create(model=GENERATOR, prompt="Hi", max_tokens=1, extra_body={"keep_alive": -1})
    _, _, body = pool_server.request("GET", "/v1/models")
    card = next(m for m in body["data"] if m["id"] == GENERATOR)
    assert card["status"] == {"value": "loaded", "size_bytes": card["status"]["size_bytes"], "expires_at": None}
    status, _, _ = pool_server.request("POST", "/v1/chat/completions",
                                      {"model": ENCODER, "messages": [{"role": "user", "content": "x"}],
                                       "keep_alive": "1s"})
    assert status == 400  # an encoder cannot chat: loaded, refused, and still unloaded after its second
    assert _status(pool_server)[ENCODER] == "loaded"
    assert _wait(lambda: _status(pool_server)[ENCODER] == "unloaded", 10)
    for bad in ("soon", "5x", True, [1]):
        status, _, payload = pool_server.request("POST", "/v1/completions",
                                                 {"model": GENERATOR, "prompt": "x", "keep_alive": bad})
        assert status == 400 and payload["error"]["param"] == "keep_alive", payload


def test_names_not_allowed_are_404(pool_server):
    for name in ("nope", "/etc/passwd", str(ENCODER) + "/../x", "gemma3-270m-instruct", "all-mpnet-base-v2"):
        status, _, payload = pool_server.request("POST", "/v1/completions", {"model": name, "prompt": "x"})
        assert status == 404, payload
        assert payload["error"]["code"] == "model_not_found" and repr(name) in payload["error"]["message"]
        assert GENERATOR in payload["error"]["message"]  # what is allowed
    status, _, payload = pool_server.request("GET", "/v1/models/nope")
    assert status == 404 and "'nope'" in payload["error"]["message"]
    status, _, payload = pool_server.request("POST", "/v1/completions", {"prompt": "x"})
    assert status == 400 and payload["error"]["param"] == "model"  # three allowed: the model is required


def test_over_the_memory_budget_is_507_naming_it(pool_server):
    status, _, payload = pool_server.request("POST", "/v1/completions", {"model": TOO_BIG, "prompt": "x"})
    assert status == 507, payload
    message = payload["error"]["message"]
    assert TOO_BIG in message and "memory_limit is 1000.0 MiB" in message
    assert _status(pool_server)[TOO_BIG] == "unloaded"


def test_all_busy_is_503_with_retry_after(pool_server, client):
    """The one slot holds a model with a stream running: another model cannot evict it."""
    stream = client.completions.create(model=GENERATOR, prompt="Once upon a time", max_tokens=400,
                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
    first = next(iter(stream))
    assert first.choices[0].text is not None
    status, headers, payload = pool_server.request("POST", "/v1/embeddings", {"model": ENCODER, "input": "x"})
    assert status == 503 and headers.get("retry-after") == "2", payload
    assert payload["error"]["code"] == "models_busy" and ENCODER in payload["error"]["message"]
    stream.close()
    assert _wait(lambda: pool_server.request("POST", "/v1/embeddings",
                                             {"model": ENCODER, "input": "x"})[0] == 200, 30)


def test_concurrent_first_requests_load_once(pool_server, client):
    pool_server.request("POST", "/v1/completions", {"model": GENERATOR, "prompt": "x", "max_tokens": 1,
                                                   "keep_alive": 0})  # nothing loaded now
    assert _status(pool_server)[GENERATOR] == "unloaded"
    loads_before = _loads(pool_server)
    texts: list = []

    def ask():
        texts.append(client.completions.create(model=GENERATOR, prompt="1, 2, 3,", max_tokens=4,
                                               temperature=0).choices[0].text)

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(texts) == 3 and len(set(texts)) == 1
    assert _loads(pool_server) == loads_before + 1  # one load served all three


def _loads(server) -> int:
    return sum(line.endswith(f"INFO loading {GENERATOR}") for line in server.log.read_text().splitlines())


def test_loading_blocks_neither_health_nor_other_streams(tmp_path_factory, smollm2_gguf):
    """A model loading (on a thread) while another streams: the stream's tokens and /health keep coming."""
    s = ServerProcess(tmp_path_factory.mktemp("serve-load"), "-m", GENERATOR, "--allow-model", ENCODER,
                      "--api-key", API_KEY)
    try:
        client = openai.OpenAI(base_url=s.base_url, api_key=API_KEY, max_retries=0)
        # Long enough to outlast the encoder's load (a cold worker start and compile: several seconds on 2 cores,
        # while 300 tokens took 2 s once decode reached 150 tok/s); closed as soon as the load is done.
        stream = client.completions.create(model=GENERATOR, prompt="Once upon a time", max_tokens=3000,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        it = iter(stream)
        next(it)
        arrivals: list[float] = []
        health: list[float] = []
        loaded: dict = {}

        def load():
            loaded["start"] = time.monotonic()
            loaded["status"] = s.request("POST", "/v1/embeddings", {"model": ENCODER, "input": "a cat"})[0]
            loaded["end"] = time.monotonic()

        loader = threading.Thread(target=load)
        loader.start()
        while loader.is_alive():
            t = time.monotonic()
            assert s.request("GET", "/health", key=None)[0] == 200
            health.append(time.monotonic() - t)
            for _ in range(3):
                next(it)
                arrivals.append(time.monotonic())
        loader.join()
        stream.close()
        assert loaded["status"] == 200
        during = [a for a in arrivals if loaded["start"] < a < loaded["end"]]
        assert loaded["end"] - loaded["start"] > 0.5  # a real load (a worker started, weights read)
        assert len(during) >= 3, (len(during), loaded)  # the stream kept going while the encoder loaded
        assert max(health) < 1.0, health
    finally:
        assert s.stop() == 0, s.log_text()


def test_pool_ps_and_unload_in_process(tmp_path):
    """ModelPool on its own (what Ollama's /api/ps reads): real sandboxed Sessions of a tiny GGUF."""
    from tiny_model import write_tiny_llama

    from corejax import Session
    from corejax.server.app import ServedModel
    from corejax.server.models import ModelPool, allowed_models, parse_keep_alive

    path = write_tiny_llama(tmp_path / "tiny-ps.gguf")
    allowed = allowed_models([], [str(path)], allow_registry=False)
    assert list(allowed) == ["tiny-ps"] and allowed["tiny-ps"].path == path.absolute()
    assert parse_keep_alive("1h30m") == 5400 and parse_keep_alive("300ms") == 0.3
    assert parse_keep_alive("-1") == float("inf") and parse_keep_alive(2.5) == 2.5

    def load(model_id, what):
        return ServedModel(model_id, Session(what, progress=False, keep_alive=0))

    async def run():
        pool = ModelPool(allowed, load, max_models=1, keep_alive_s=60)
        assert pool.ps() == [] and pool.default_id() == "tiny-ps"
        model = await pool.get("tiny-ps")
        model.in_flight += 1  # what the server's admission does
        (row,) = pool.ps()
        assert row["id"] == "tiny-ps" and row["source"] == str(path.absolute()) and row["in_flight"] == 1
        assert row["size_bytes"] > 0 and row["expires_at"] is None  # no expiry while a request runs
        model.in_flight -= 1
        pool.release(model)
        assert pool.ps()[0]["expires_at"] == pytest.approx(time.time() + 60, abs=5)
        assert pool.unload("tiny-ps") and pool.ps() == [] and not pool.unload("tiny-ps")
        await asyncio.gather(*pool._closing)  # the worker stopped

    asyncio.run(run())


def test_allow_registry_lists_the_cached_models_only(tmp_path, smollm2_gguf):
    from corejax import hub

    s = ServerProcess(tmp_path, "--allow-registry", "--max-models", "1")
    try:
        status, _, body = s.request("GET", "/v1/models", key=None)
        assert status == 200
        cached = [name for name in hub.REGISTRY if hub.is_cached(name)]
        assert [m["id"] for m in body["data"]] == cached and GENERATOR in cached
        assert all(m["status"]["value"] == "unloaded" for m in body["data"])  # nothing preloaded
        status, _, payload = s.request("POST", "/v1/completions", {"model": str(smollm2_gguf), "prompt": "x"},
                                       key=None)
        assert status == 404, payload  # the cached file's own path is not an id
    finally:
        assert s.stop() == 0, s.log_text()
