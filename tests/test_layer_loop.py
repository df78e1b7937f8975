"""The layer loop (models/stack.py, models/layers.py run_layers): stacked layers in a fori_loop give the unrolled
model's logits (within 1e-5) and greedy tokens, on tiny models and both real ones, with no weight-sized copy in
the compiled programs."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from corejax.kernels.policy import Kernels
from corejax import models
from corejax.weights import quant
from corejax.engine.cache import DenseKVCache, PagedKVCache
from corejax.models.stack import StackedLayers, stack_layers

PAGE = 16


def _forward(params, tokens, positions, cache, cfg, kernels):
    with kernels.active():
        return models.forward(params, tokens, positions, cache, cfg)


def _logits(params, tokens, positions, cache, cfg):
    with Kernels.detect().active():  # what a jit site passes: this process's kernels
        hidden, cache = models.forward(params, tokens, positions, cache, cfg)
        return models.lm_head(params, hidden, cfg), cache


def _greedy_run(params, cfg, prompt: np.ndarray, steps: int, kv_dtype: str = "float32"):
    """Prefill `prompt` [1, T] (T <= 16, padded to 16) through a paged cache, then `steps` greedy decode steps:
    -> (logits of every step [steps + 1, V], the tokens chosen)."""
    run = jax.jit(lambda p, t, pos, c: _logits(p, t, pos, c, cfg))
    table = jnp.arange(1, 5, dtype=jnp.int32)[None]  # pages 1..4: 64 tokens
    cache = PagedKVCache.create(cfg, 8, PAGE, kv_dtype)
    n = prompt.shape[1]
    tokens = np.zeros((1, 16), np.int32)
    tokens[0, :n] = prompt[0]
    logits, cache = run(params, tokens, np.arange(16, dtype=np.int32)[None],
                        cache.with_rows(table, jnp.array([n], jnp.int32)))
    out, chosen = [np.asarray(logits[0, n - 1])], []
    for pos in range(n, n + steps):
        chosen.append(int(out[-1].argmax()))
        logits, cache = run(params, np.array([[chosen[-1]]], np.int32), np.array([[pos]], np.int32),
                            cache.with_rows(table, jnp.array([pos + 1], jnp.int32)))
        out.append(np.asarray(logits[0, 0]))
    chosen.append(int(out[-1].argmax()))
    return np.stack(out), chosen


def _assert_same(unrolled_params, stacked_params, cfg, prompt, steps=8, kv_dtype="float32", tol=1e-5):
    """Same greedy tokens; logits within tol of the largest logit (float32 sums in another order)."""
    ref, ref_tokens = _greedy_run(unrolled_params, cfg, prompt, steps, kv_dtype)
    got, tokens = _greedy_run(stacked_params, cfg, prompt, steps, kv_dtype)
    assert tokens == ref_tokens
    np.testing.assert_allclose(got, ref, atol=tol * np.abs(ref).max(), rtol=0)


def _tiny(tmp_path, arch, quantize):
    from corejax.loading.loader import load_model
    from corejax.hub import ModelSource
    from tiny_model import write_tiny_llama

    path = write_tiny_llama(tmp_path / f"{arch}.gguf", arch=arch, layers=4, hidden=64, ffn=128, context=128,
                            quantize=quantize)
    return load_model(ModelSource(arch, "gguf", path), progress=False)


QUANTIZED_TOL = 2e-3  # see test_real_quantized_model_loop_equals_unrolled


@pytest.mark.parametrize("quantize", [None, "Q8_0", "Q4_1"])
def test_tiny_llama_loop_equals_unrolled(tmp_path, quantize):
    """Float weights within 1e-5; quantized FFNs (int8-rounded activations) within QUANTIZED_TOL."""
    model = _tiny(tmp_path, "llama", quantize)
    stacked = stack_layers(model.params)
    assert isinstance(stacked["layers"], StackedLayers) and stacked["layers"].num_layers == 4
    prompt = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (1, 11)).astype(np.int32)
    for kv in ("float32", "bf16", "int8"):
        _assert_same(model.params, stacked, model.cfg, prompt, kv_dtype=kv, tol=QUANTIZED_TOL if quantize else 1e-5)


def test_layers_of_different_layouts_share_one_loop(tmp_path):
    """A Q4_K_M file keeps some layers' w_down in another format: such layers form their own stacked group, read
    through lax.switch. Here layer 1's w_down is int8 while the others are 4-bit (and w_up the other way)."""
    model = _tiny(tmp_path, "llama", None)
    layers = [dict(layer) for layer in model.params["layers"]]
    for i, layer in enumerate(layers):
        for key, bits in (("w_down", 8 if i == 1 else 4), ("w_up", 4 if i == 2 else 8)):
            layer[key] = quant.quantize(np.asarray(layer[key]).T, bits)  # [out, in], as checkpoints store it
    params = dict(model.params, layers=layers)
    stacked = stack_layers(params)
    slots = dict(stacked["layers"].slots)
    assert len(stacked["layers"].groups["w_down"]) == 2 and slots["w_down"][1] == (1, 0)
    assert [s[0] for s in slots["w_up"]] == [0, 0, 1, 0]
    prompt = np.arange(3, 14, dtype=np.int32)[None]
    _assert_same(params, stacked, model.cfg, prompt, tol=QUANTIZED_TOL)
    back = stacked["layers"].unstacked()
    np.testing.assert_array_equal(np.asarray(back[1]["w_down"].codes), np.asarray(layers[1]["w_down"].codes))


def test_dense_cache_and_per_layer_windows(tmp_path):
    """Gemma-style windows as per-layer data: the dense reference cache with a traced window per layer."""
    import dataclasses

    model = _tiny(tmp_path, "llama", "Q8_0")
    cfg = dataclasses.replace(model.cfg, layer_windows=(5, 0, 5, 0))
    stacked = stack_layers(model.params)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 20)).astype(np.int32)
    pos = np.broadcast_to(np.arange(20, dtype=np.int32), (2, 20))
    run = jax.jit(lambda p, c: _logits(p, ids, pos, c, cfg)[0])
    ref = np.asarray(run(model.params, DenseKVCache.create(cfg, 2, 32)))
    got = np.asarray(run(stacked, DenseKVCache.create(cfg, 2, 32)))
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    full = dataclasses.replace(cfg, layer_windows=(0, 0, 0, 0))
    assert not np.allclose(np.asarray(jax.jit(lambda p, c: _logits(p, ids, pos, c, full)[0])(
        stacked, DenseKVCache.create(cfg, 2, 32))), got, atol=1e-3)  # the windows did something


REAL = ["smollm2-135m-instruct", "gemma3-270m"]


def _runtime(name, weights=None):
    from corejax.hub import resolve
    from corejax.worker.start import open_runtime

    return open_runtime(resolve(name, progress=False), progress=False, weights=weights)


@pytest.fixture(scope="module", params=REAL)
def real_runtime(request):
    return _runtime(request.param)


def _real_prompt(rt):
    return np.asarray([rt.tokenizer.encode("The capital of France is", add_special=True)], np.int32)


@pytest.mark.parametrize("name", REAL)
def test_real_model_loop_equals_unrolled(name):
    """Float32 weights (the native float kernel) stacked vs the same weights unrolled: logits within 1e-5 (of
    the largest) over a prefill and 8 greedy steps, same tokens."""
    rt = _runtime(name, "f32")
    stacked = rt.runner.params
    unrolled = dict(stacked, layers=stacked["layers"].unstacked())
    _assert_same(unrolled, stacked, rt.runner.cfg, _real_prompt(rt))


def test_real_quantized_model_loop_equals_unrolled(real_runtime):
    """The runtime's own params (the files' quantized formats; Gemma's Q4_K_M mixes formats in w_down and wv, so
    its loop switches between groups) against the same weights unrolled: same greedy tokens. Logits within 2e-3
    (of the largest), not 1e-5: the quantized kernel rounds activations to int8, so float32 sums taken in another
    order (XLA fuses the unrolled program differently) can flip a rounding step, and the flip propagates (one
    layer alone is bit-equal; measured up to 1.1e-4 of the largest logit on SmolLM2)."""
    rt = real_runtime
    stacked = rt.runner.params
    assert isinstance(stacked["layers"], StackedLayers)
    if rt.runner.cfg.arch == "gemma3":  # its Q4_K_M file mixes Q6_K and Q4_K w_down layers
        assert len(stacked["layers"].groups["w_down"]) == 2
    unrolled = dict(stacked, layers=stacked["layers"].unstacked())
    _assert_same(unrolled, stacked, rt.runner.cfg, _real_prompt(rt), tol=QUANTIZED_TOL)


_SIZES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1}
_MOVES = r"= (\w+)\[([\d,]*)\]\S* (copy|transpose|convert|dynamic-slice|slice|gather|concatenate)\("


def _computations(text: str) -> dict[str, list[str]]:
    comps, name = {}, None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            name = head.group(1)
            comps[name] = []
        elif name is not None:
            comps[name].append(line)
    return comps


def _loop_body_lines(text: str) -> list[str]:
    """The instructions of every while loop's body and of what it calls (fusions, switch branches)."""
    comps = _computations(text)
    todo = [m for lines in comps.values() for line in lines for m in re.findall(r"body=%([\w.\-]+)", line)]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        for line in comps[name]:
            todo += re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", line)
            for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
                todo += re.findall(r"%([\w.\-]+)", group)
    return [line for name in seen for line in comps[name]]


def _moves_of_shape(lines: list[str], shapes: set[tuple[int, ...]]) -> list[str]:
    """Data-moving ops whose output has one of `shapes` (dims of size 1 ignored)."""
    found = []
    for line in lines:
        m = re.search(_MOVES, line)
        if m and tuple(int(d) for d in m.group(2).split(",") if d and d != "1") in shapes:
            found.append(line.strip()[:160])
    return found


@pytest.mark.parametrize("kv_dtype", ["float32", "bf16"])
def test_no_weight_or_cache_sized_copies(real_runtime, kv_dtype):
    """shared/PERF-NOTES.md: a copy, transpose or convert whose output is weight-sized means XLA copies weights
    (or a layer of the KV cache) out every step. In the loop, each layer's weights are read in place by the
    kernels: no data-moving op in the loop may output one layer of a stacked weight or of the KV pool."""
    rt = real_runtime
    cfg, params = rt.runner.cfg, rt.runner.params
    cache = PagedKVCache.create(cfg, 256, PAGE, kv_dtype, kernels=rt.kernels)
    stacks = jax.tree.leaves((params["layers"].groups, cache.k_pages))
    shapes = {tuple(d for d in a.shape[1:] if d != 1) for a in stacks if a.ndim >= 3}  # one layer of each
    f = jax.jit(lambda p, t, pos, c: _forward(p, t, pos, c, cfg, rt.kernels), donate_argnums=(3,))
    for t in (1, 16):
        c = cache.with_rows(jnp.zeros((1, 8), jnp.int32), jnp.array([t], jnp.int32))
        text = f.lower(params, jnp.zeros((1, t), jnp.int32), jnp.arange(t, dtype=jnp.int32)[None], c).compile().as_text()
        body = _loop_body_lines(text)
        assert len(body) > 20  # the layer loop is a loop in the program
        found = _moves_of_shape(body, shapes)
        assert not found, f"T={t}: a layer of a weight or of the KV pool is copied in the loop: {found}"


def test_programs_per_workload(tmp_path):
    """A default request builds two programs (a prefill chunk and the decode step); greedy and other sampling
    values reuse them; only the documented variants (top_k = 0 with top_p < 1, logprobs) build new ones."""
    from corejax.engine.programs import programs_built
    from corejax.hub import ModelSource
    from corejax.worker.start import open_runtime
    from corejax.types.options import SamplingParams
    from tiny_model import write_tiny_llama

    rt = open_runtime(ModelSource("tiny", "gguf", write_tiny_llama(tmp_path / "t.gguf", layers=6)), progress=False)

    def new_programs(**kw) -> dict[str, int]:
        before = programs_built()
        text = "".join(c.text for c in rt.stream("Hello there", None, SamplingParams(max_tokens=6, **kw)))
        assert isinstance(text, str)
        return {k: n - before[k] for k, n in programs_built().items() if n != before[k]}

    assert new_programs() == {"_prefill": 1, "_decode_step": 1}
    for kw in ({"temperature": 0.0}, {"temperature": 1.3, "top_k": 7, "top_p": 0.5, "seed": 4}, {"min_p": 0.2}):
        assert new_programs(**kw) == {}, kw
    assert new_programs(top_k=0, top_p=0.9) == {"_prefill": 1, "_decode_step": 1}  # the full-vocabulary path
    assert new_programs(logprobs=2) == {"_prefill": 1, "_decode_step": 1}
    assert new_programs(logprobs=5) == {}  # one logprobs variant serves every count
