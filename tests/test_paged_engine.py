"""The engine over the paged KV cache vs the dense reference path; prefix reuse; chunked prefill; KV dtypes."""

from __future__ import annotations

import gc
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from corejax import CacheFullError, models
from corejax.engine.cache import DenseKVCache
from corejax.types.config import EngineConfig
from corejax.types.options import SamplingParams
from corejax.hub import ModelSource
from corejax.kernels.kv_quant import dequantize_kv
from corejax.worker.generator import Generator
from corejax.worker.start import open_runtime
from tiny_model import write_tiny_llama

GREEDY = dict(temperature=0.0, ignore_eos=True)
STORY = "the cat sat on the mat and the dog sat on the log; " * 6


def dense_greedy(runtime: Generator, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens from the dense reference cache (models.forward over DenseKVCache, no paging)."""
    cfg, params = runtime.model.cfg, runtime.model.params

    @jax.jit
    def step(params, tokens, positions, cache):  # params as an argument: never baked into the program
        with runtime.kernels.active():
            hidden, cache = models.forward(params, tokens, positions, cache, cfg)
            return models.lm_head(params, hidden[:, -1:], cfg)[0, 0], cache

    cache = DenseKVCache.create(cfg, 1, len(prompt) + n)
    logits, cache = step(params, jnp.asarray([prompt]), jnp.arange(len(prompt))[None], cache)
    out = [int(jnp.argmax(logits))]
    for i in range(n - 1):
        logits, cache = step(params, jnp.asarray([[out[-1]]]), jnp.asarray([[len(prompt) + i]]), cache)
        out.append(int(jnp.argmax(logits)))
    return out


def run(runtime: Generator, prompt: str, **kw):
    return [c.result for c in runtime.stream(prompt, None, SamplingParams(**kw)) if c.result][0]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", context=256)


@pytest.mark.parametrize("page_size,chunk", [(16, 512), (8, 16), (32, 24)])
def test_paged_greedy_equals_dense_reference(tiny_path, page_size, chunk):
    rt = open_runtime(ModelSource("tiny", "gguf", tiny_path), progress=False,
                 engine=EngineConfig(page_size=page_size, prefill_chunk=chunk))
    r = run(rt, STORY, max_tokens=30, **GREEDY)
    assert list(r.tokens) == dense_greedy(rt, list(r.prompt_tokens), 30)


def test_prefix_reuse_across_calls(tiny_path):
    rt = open_runtime(ModelSource("tiny", "gguf", tiny_path), progress=False, engine=EngineConfig(page_size=16))
    first = run(rt, STORY + "first", max_tokens=10, **GREEDY)
    second = run(rt, STORY + "second", max_tokens=10, **GREEDY)
    assert first.timings.cached_prompt_tokens == 0
    shared = len(rt.tokenizer.encode(STORY))
    assert second.timings.cached_prompt_tokens == (shared - 1) // 16 * 16 > 0
    alone = open_runtime(ModelSource("tiny", "gguf", tiny_path), progress=False)
    assert run(alone, STORY + "second", max_tokens=10, **GREEDY).tokens == second.tokens
    # The same prompt again reuses all its full pages (stopping one token short of the end).
    again = run(rt, STORY + "second", max_tokens=10, **GREEDY)
    assert again.timings.cached_prompt_tokens == (len(again.prompt_tokens) - 1) // 16 * 16
    assert again.tokens == second.tokens


def test_pool_too_small_is_a_clear_error(tiny_path):
    rt = open_runtime(ModelSource("tiny", "gguf", tiny_path), progress=False,
                 engine=EngineConfig(page_size=16, kv_cache_tokens=32))
    with pytest.raises(CacheFullError, match="raise the KV cache size"):
        run(rt, STORY, max_tokens=4, **GREEDY)
    assert run(rt, "the cat", max_tokens=4, **GREEDY).finish_reason == "length"  # nothing leaked


def _layer0_pages(cache) -> tuple[np.ndarray, np.ndarray | None]:
    """Layer 0's keys as float32 [kv heads, pages, page size, head dim], and its scales' bound on the
    rounding error (half a quantization step) for int8/int4 pages."""
    k = np.asarray(cache.k_pages[0])
    if cache.k_scales is None:
        if k.dtype == np.uint16:  # bf16 bits
            return (k.astype(np.uint32) << 16).view(np.float32), None
        return k, None
    deq = np.asarray(dequantize_kv(cache.k_pages[0], cache.k_scales[0]))
    return deq, np.asarray(cache.k_scales[0])[..., None] / 2


@pytest.mark.parametrize("kv_dtype,ratio", [("bf16", 2), ("int8", 3), ("int4", 5)])
def test_quantized_kv_pools_are_smaller_and_hold_the_same_keys(tiny_path, kv_dtype, ratio):
    f32 = open_runtime(ModelSource("tiny", "gguf", tiny_path), progress=False, engine=EngineConfig(kv_dtype="float32"))
    rt = open_runtime(ModelSource("tiny", "gguf", tiny_path), progress=False, engine=EngineConfig(kv_dtype=kv_dtype))
    assert rt.runner.kv_cache_bytes * ratio <= f32.runner.kv_cache_bytes * 1.3
    run(f32, STORY, max_tokens=1, **GREEDY)  # the prompt's keys only (the first token comes from the prefill)
    run(rt, STORY, max_tokens=1, **GREEDY)
    # Layer 0's keys of the prompt depend on the tokens alone, so the quantized pool holds the float pool's
    # keys up to its rounding: half a step per value for int8/int4, bfloat16's relative 2^-8 for bf16.
    exact, _ = _layer0_pages(f32.runner.cache)
    got, half_step = _layer0_pages(rt.runner.cache)
    assert np.abs(exact).max() > 0
    bound = np.abs(exact) * 2.0 ** -8 if half_step is None else half_step * 1.001
    assert (np.abs(got - exact) <= bound + 1e-6).all(), np.abs(got - exact).max()
    r = run(rt, STORY + " and on", max_tokens=12, **GREEDY)
    assert len(r.tokens) == 12 and all(0 <= t < rt.model.cfg.vocab_size for t in r.tokens)


@pytest.mark.slow
def test_real_model_greedy_under_quantized_kv(smollm2_gguf):
    """Measured on SmolLM2 (tokens identical to f32 KV before the first difference, of 32, five prompts):
    bf16 [32, 32, 32, 32, 32], int8 [2, 32, 32, 32, 32], int4 [4, 3, 3, 1, 0] — int4 with one scale per
    (token, head) is too coarse for greedy fidelity; it is offered for memory, with that caveat."""
    prompts = ["The old lighthouse keeper", "def fibonacci(n):", "The capital of France is",
               "Once upon a time, in a land far away,", "Water boils at"]
    outs = {}
    for kv in ("float32", "bf16", "int8"):
        rt = open_runtime(ModelSource("smollm2", "gguf", smollm2_gguf), weights="f32", progress=False,
                     engine=EngineConfig(kv_dtype=kv))
        outs[kv] = [run(rt, p, max_tokens=32, **GREEDY).tokens for p in prompts]
    assert outs["bf16"] == outs["float32"]
    assert sum(a == b for a, b in zip(outs["int8"], outs["float32"])) >= 4


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["smollm2_gguf", "gemma3_gguf"])
def test_real_models_paged_equals_dense(request, fixture):
    path = request.getfixturevalue(fixture)
    rt = open_runtime(ModelSource(path.stem, "gguf", path), progress=False)
    long_prompt = "The lighthouse keeper wrote down the weather, the ships and the birds. " * 40
    for prompt in ("The old lighthouse keeper", long_prompt):  # the long one passes Gemma's 512 window
        r = run(rt, prompt, max_tokens=32, **GREEDY)
        assert list(r.tokens) == dense_greedy(rt, list(r.prompt_tokens), 32), prompt[:30]
    again = run(rt, long_prompt, max_tokens=8, **GREEDY)
    assert again.timings.cached_prompt_tokens >= len(again.prompt_tokens) - 16
    print(f"\n{path.name}: prefix reuse {again.timings.cached_prompt_tokens}/{len(again.prompt_tokens)} tokens,"
          f" time to first token {again.timings.time_to_first_token_s:.3f}s")


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="counts this process's memory mappings (Linux)")
def test_dropped_runtime_frees_its_compiled_programs(tiny_path):
    """Each XLA CPU program keeps ~3 memory mappings per fused kernel and Linux allows 65,530 per process: a
    process that loads model after model must get them back when a Runtime is dropped (they once lived as long
    as the process, and a long test session crashed inside XLA's compiler)."""

    def mappings() -> int:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)

    gc.collect()
    before = mappings()
    rt = open_runtime(ModelSource("tiny", "gguf", tiny_path), progress=False,
                 engine=EngineConfig(page_size=8, prefill_chunk=24))  # programs no other test compiled
    run(rt, STORY, max_tokens=4, **GREEDY)
    live = mappings() - before
    del rt
    assert live > 20  # the programs' code is mapped while the Runtime lives
    # The scheduler's thread may still be finishing the last step (it holds its scheduler, and so the Runtime,
    # only while stepping): the Runtime must be gone within a few of its idle waits (0.5 s), not at once.
    deadline = time.monotonic() + 5.0
    while True:
        gc.collect()
        left = mappings() - before
        if left < live / 4 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert left < live / 4
