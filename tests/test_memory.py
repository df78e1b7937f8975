"""The memory budget: sizes parsed, weights sized from headers exactly, a too-small limit refused before any
allocation (in-process and across the sandbox), and the KV pool sized to what the limit leaves."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from tiny_model import write_tiny_llama

import corejax
from corejax.worker import memory
from corejax.types.config import EngineConfig
from corejax.errors import InvalidParameterError, MemoryBudgetError
from corejax.hub import ModelSource


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("mem") / "tiny.gguf", context=256)


@pytest.mark.parametrize("value, expected", [
    (4096, 4096), ("512MiB", 512 << 20), ("2GiB", 2 << 30), ("1.5GB", 1_500_000_000), ("800M", 800 << 20),
    ("  3 gib ", 3 << 30), ("1000", 1000), ("64KB", 64_000), ("0.5TiB", 1 << 39),
])
def test_parse_size(value, expected):
    assert memory.parse_size(value) == expected


@pytest.mark.parametrize("value", [0, -1, "0GiB", "2 parsecs", "GiB", "", "-1GiB", True, 1.5, None, [1]])
def test_parse_size_rejects(value):
    with pytest.raises(InvalidParameterError, match="memory_limit"):
        memory.parse_size(value)


def test_session_rejects_a_bad_limit_before_starting(tiny):
    with pytest.raises(InvalidParameterError, match="'2 parsecs' is not a size"):
        corejax.Session(str(tiny), memory_limit="2 parsecs", sandbox=False)


@pytest.mark.parametrize(("option", "message"), [({"warmup": "all"}, "warmup must be True, False or \"batches\""),
                                                 ({"max_prefill_stall": 0}, "max_prefill_stall must be a positive")])
def test_session_rejects_a_bad_warmup_or_stall_before_starting(tiny, option, message):
    with pytest.raises(InvalidParameterError, match=message):
        corejax.Session(str(tiny), sandbox=False, **option)


def _tiny_variant(tmp_path, **kw) -> Path:
    return write_tiny_llama(tmp_path / "v.gguf", **kw)


@pytest.mark.parametrize("weights", ["f32", "native", "int8", "int4"])
@pytest.mark.parametrize("variant", [{}, {"tie_embeddings": False}, {"quantize": "Q4_1"}, {"quantize": "Q5_0"}])
def test_weights_are_sized_from_the_header_before_loading(tmp_path, weights, variant):
    from corejax.loading.loader import load_model, plan_weights

    src = ModelSource("v", "gguf", _tiny_variant(tmp_path, **variant))
    plan = plan_weights(src, weights)
    actual = load_model(src, weights=weights, progress=False).info["weight_bytes"]
    # Exact for these formats; for K-quants the plan counts scales as float32, an upper bound (Gemma 3's
    # Q4_K_M file: 279.9 MB planned, 278.9 MB loaded natively).
    assert plan.weight_bytes == actual
    assert plan.loading_bytes >= plan.file_bytes


def test_too_small_a_budget_fails_before_anything_is_allocated(tiny, monkeypatch):
    from corejax.worker import generator, start

    def never(*a, **k):
        raise AssertionError("the model was loaded despite a budget it cannot fit")

    monkeypatch.setattr(start, "load_model", never)
    monkeypatch.setattr(generator, "ModelRunner", never)
    with pytest.raises(MemoryBudgetError) as e:
        start.open_runtime(ModelSource("tiny", "gguf", tiny), engine=EngineConfig(kv_cache_tokens=256),
                           progress=False, memory_limit="200MiB")
    msg = str(e.value)
    assert "loading tiny needs" in msg and "memory_limit is 200.0 MiB" in msg
    for part in ("runtime", "tokenizer", "weights", "kv_pool", "workspace", "kv_cache_tokens", "raise memory_limit"):
        assert part in msg, part


def test_native_weights_are_offered_only_when_they_shrink_the_total(tiny):
    import dataclasses

    from corejax.loading.loader import plan_weights

    plan = plan_weights(ModelSource("tiny", "gguf", tiny), "f32")
    big = dataclasses.replace(plan, weight_bytes=2 << 30, native_bytes=100 << 20)  # as a 2 GiB f32 checkpoint
    with pytest.raises(MemoryBudgetError, match="weights='native'"):
        memory.admit(memory.MemoryBudget("1GiB"), big, EngineConfig(kv_cache_tokens=256))
    # Without the quantized kernel, the tiny model's native blocks save 35 KiB but compile to bigger programs
    # (XLA's dequantize loops): not worth offering. With it, a matmul is one call either way: offered.
    for kernel in (False, True):
        with pytest.raises(MemoryBudgetError) as e:
            memory.admit(memory.MemoryBudget("300MiB"), plan, EngineConfig(kv_cache_tokens=256), native=kernel)
        assert ("native" in str(e.value)) == kernel


def test_budget_error_crosses_the_sandbox_fast(tiny):
    start = time.monotonic()
    with pytest.raises(MemoryBudgetError, match="memory_limit is 256.0 MiB"):
        corejax.Session(str(tiny), memory_limit="256MiB", progress=False)
    assert time.monotonic() - start < 30  # a worker start and a header read, no load, no compile


def test_reservations_are_reported_and_match_what_was_allocated(tiny):
    with corejax.Session(str(tiny), sandbox=False, memory_limit="1GiB", kv_cache_tokens=128, kv_dtype="int8",
                         progress=False) as s:
        info = s.info()
        runtime = s._runtime
    mem = info["memory"]
    assert mem["limit"] == 1 << 30
    assert set(mem["reservations"]) == {"runtime", "tokenizer", "weights", "kv_pool", "workspace"}
    assert mem["reservations"]["weights"]["bytes"] == info["weight_bytes"]
    assert mem["reservations"]["kv_pool"]["bytes"] == info["kv_cache_bytes"] == runtime.runner.kv_cache_bytes
    assert mem["used"] == sum(r["bytes"] for r in mem["reservations"].values()) <= mem["limit"]
    assert mem["peak"] >= mem["used"]


def test_without_a_limit_reservations_are_recorded_never_refused(tiny):
    from corejax.worker.start import open_runtime

    r = open_runtime(ModelSource("tiny", "gguf", tiny), progress=False)
    report = r.budget.report()
    assert report["limit"] is None and report["available"] is None
    assert report["reservations"]["kv_pool"]["bytes"] == r.runner.kv_cache_bytes


def test_kv_pool_is_sized_to_what_the_limit_leaves(tmp_path):
    from corejax.worker.start import open_runtime

    # 2 layers x 2 KV heads x 64 dims: 1 KiB of bfloat16 KV per token, 64k tokens of context (64 MiB).
    path = write_tiny_llama(tmp_path / "long.gguf", context=65536, hidden=256, heads=4, kv_heads=2, ffn=512)
    src = ModelSource("long", "gguf", path)
    full = open_runtime(src, progress=False)
    assert full.info()["kv_cache_tokens"] == 65536
    others = sum(r["bytes"] for name, r in full.budget.report()["reservations"].items() if name != "kv_pool")
    limit = others + (40 << 20)  # room for 40 MiB of KV: 40960 tokens minus the padding page
    r = open_runtime(src, progress=False, memory_limit=limit)
    ec = r.runner.engine_cfg
    per_page = ec.kv_bytes_per_token(r.model.cfg) * ec.page_size
    expected = (int((40 << 20) // per_page) - 1) * ec.page_size
    assert r.info()["kv_cache_tokens"] == expected == 40944
    assert r.budget.used <= limit
    with pytest.raises(MemoryBudgetError, match="the smallest useful pool"):
        open_runtime(src, progress=False, memory_limit=others + (256 << 10))
