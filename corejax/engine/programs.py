"""The jit sites (prefill chunk, decode step, full-sequence logits, page copy, encoder batch, token scoring) over
the paged KV cache; the model runners (corejax/serving/runner.py) are their only callers.

Each program holds one compiled layer run in a loop over the stacked layers (models/stack.py), so its size
and compile time do not grow with the layer count. What makes a new program: a new ModelConfig, a batch or
prompt-chunk bucket or page-table width (powers of two; the width covers prompt + max_tokens, at least 16
pages), a non-final vs final (sampling) prompt chunk, and the sampler's few variants (corejax/engine/sampling.py):
greedy and default sampling share one; top_k = 0 with top_p < 1, top_k > 64, penalties and logprobs each
select another. Values of temperature, top-k/top-p/min-p, seeds, positions, tokens, page tables and lengths are
traced and never recompile. A default `corejax generate` builds 2 programs (one prefill chunk, one decode
step); 16 concurrent streams of mixed prompts, greedy and sampled, 4 more (`programs_built()` counts them).

Every site takes the kernel policy (kernels/policy.py Kernels) as a static argument and traces the model under it,
so which kernels a program calls is part of its key. Each runner jits its own copies of the sites (Programs), so
its compiled programs are freed with it rather than living as long as the process.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any

import jax
import jax.numpy as jnp

from corejax import models
from corejax.engine.cache import BidirectionalAttention, DenseKVCache, PagedKVCache
from corejax.kernels.policy import Kernels
from corejax.models import bert, sentence
from corejax.types.config import EncoderConfig, ModelConfig
from corejax.engine.sampling import (
    PenaltyState,
    SampleOutput,
    SamplingTensors,
    sample,
    update_penalty_state,
)

# The jit sites, by the names Programs gives them (the multi-host replay, engine/distributed.py, publishes each).
SITES = ("prefill", "decode_step", "copy_page", "full_logits", "encode", "token_logprobs")
_programs: dict[str, int] = {f"_{site}": 0 for site in SITES}
_programs_lock = threading.Lock()


def _count_program(event: str, duration: float, **kwargs) -> None:
    name = str(kwargs.get("fun_name", "")).removeprefix("jit(").removesuffix(")")
    if event == "/jax/core/compile/backend_compile_duration" and name in _programs:
        with _programs_lock:
            _programs[name] += 1


jax.monitoring.register_event_duration_secs_listener(_count_program)


def programs_built() -> dict[str, int]:
    """Executables this process has built for each jit site so far (compiled, or loaded from the persistent
    cache: either way a program with its own machine code in memory), from JAX's own monitoring events."""
    with _programs_lock:
        return dict(_programs)


def _prefill(params: Any, tokens: jax.Array, positions: jax.Array, last: jax.Array, cache: Any, cfg: ModelConfig,
             kernels: Kernels, sampling: SamplingTensors | None = None, penalties: PenaltyState | None = None,
             keys: jax.Array | None = None, mask: jax.Array | None = None) -> tuple[SampleOutput | None, Any]:
    """One prompt chunk: tokens, positions [B, T] (right-padded); last [B] index of each row's last real token.

    Writes the chunk's KV. With `sampling` (the prompt's final chunk) it also samples the first new token
    from the logits at `last` — only those rows of the LM head are computed — under the token bitmask
    `mask` [B, W] when some row is constrained (structured output)."""
    with kernels.active():
        hidden, cache = models.forward(params, tokens, positions, cache, cfg)
        if sampling is None:
            return None, cache
        hidden_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)  # [B, 1, D]
        logits = models.lm_head(params, hidden_last, cfg)[:, 0]
    return sample(logits, sampling, penalties, keys, 0, mask), cache


def _decode_step(params: Any, tokens: jax.Array, positions: jax.Array, cache: Any, sampling: SamplingTensors,
                 penalties: PenaltyState | None, keys: jax.Array, steps: jax.Array, cfg: ModelConfig,
                 kernels: Kernels, mask: jax.Array | None = None) -> tuple[SampleOutput, Any, PenaltyState | None]:
    """tokens, positions [B, T]: each row's last sampled token, then up to T - 1 drafted tokens (speculative
    decoding; padding past a row's length is written to page 0 and ignored) -> a sample at every position
    ([B, T] outputs): position j is drawn with the row's key at step steps + j, so a drafted token that equals
    its position's sample is exactly what plain decoding would have produced there.

    Penalties apply to position 0 only: rows with penalties are never given drafts (corejax/serving/scheduler.py).
    mask: None, or [B, T, W] token bitmasks (structured output): position j of a row draws under the grammar's
    mask after that row's first j drafted tokens. Recompiles per (B, T, page-table width) bucket and per static
    sampling flag."""
    if penalties is not None:
        penalties = update_penalty_state(penalties, tokens[:, 0])  # the fed-in token is now part of the output
    with kernels.active():
        hidden, cache = models.forward(params, tokens, positions, cache, cfg)
        logits = models.lm_head(params, hidden, cfg)  # [B, T, V]
    first = sample(logits[:, 0], sampling, penalties, keys, steps, None if mask is None else mask[:, 0])
    b, t = tokens.shape
    if t == 1:
        return jax.tree.map(lambda x: x[:, None], first), cache, penalties
    rows = lambda x: jnp.repeat(x, t - 1, axis=0)  # noqa: E731 - row b's drafted positions are rows b(t-1)..
    rest = sample(logits[:, 1:].reshape(b * (t - 1), -1), dataclasses.replace(jax.tree.map(rows, sampling),
                                                                              any_penalty=False),
                  None, rows(keys), (steps[:, None] + jnp.arange(1, t, dtype=steps.dtype)).reshape(-1),
                  None if mask is None else mask[:, 1:].reshape(b * (t - 1), -1))
    join = lambda a, r: jnp.concatenate([a[:, None], r.reshape(b, t - 1, *r.shape[1:])], axis=1)  # noqa: E731
    return jax.tree.map(join, first, rest), cache, penalties


def _copy_page(cache: PagedKVCache, src: jax.Array, dst: jax.Array) -> PagedKVCache:
    """Copy-on-write of one KV page in every layer (a page shared with a fork is about to change)."""
    return cache.copy_page(src, dst)


def _full_logits(params: Any, tokens: jax.Array, cfg: ModelConfig, kernels: Kernels) -> jax.Array:
    """tokens [B, T] -> logits [B, T, V] from one forward over a fresh cache (tests, scoring)."""
    batch, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
    cache = DenseKVCache.create(cfg, batch, t)
    with kernels.active():
        hidden, _ = models.forward(params, tokens, positions, cache, cfg)
        return models.lm_head(params, hidden, cfg)


def _encode(params: Any, tokens: jax.Array, lengths: jax.Array, cfg: EncoderConfig, kernels: Kernels, output: str,
            normalize: bool, head: tuple[jax.Array, jax.Array] | None = None,
            scores: str | None = None, dense: tuple[str, ...] = ()) -> jax.Array:
    """Encoder batch: tokens [B, T] right-padded, lengths [B] -> pooled vectors [B, D] (output "mean", "cls",
    "max"; then sentence-transformers' Dense modules, params["dense"] with the activations `dense`; L2-normalised
    if `normalize`) or classifier logits [B, L] (output "logits"). A decoder block run bidirectionally
    (cfg.decoder: EmbeddingGemma) is models.forward over BidirectionalAttention. head=(W [D, L], b [L])
    turns the pooled vectors into logits; scores "softmax" or "sigmoid" turns logits into label scores here,
    in the program, rather than in numpy afterwards (host work right after a step runs on cold caches).

    Recompiles per (B, T) bucket (corejax/serving/encode.py pads both to powers of two), per static argument and per
    head shape."""
    with kernels.active():
        if cfg.decoder is not None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
            attention = BidirectionalAttention(jnp.where(positions < lengths[:, None], positions, -1))
            hidden, _ = models.forward(params, tokens, positions, attention, cfg.decoder)
        else:
            hidden = bert.encode(params, tokens, lengths, cfg)
    if output == "logits":
        out = bert.classifier_logits(params, hidden)
    else:
        pooled = bert.pool(hidden, lengths, output)
        if dense:
            with kernels.active():
                pooled = sentence.dense_modules(pooled, params["dense"], dense)
        out = bert.l2_normalize(pooled) if normalize else pooled
        if head is not None:
            out = out @ head[0] + head[1]
    if scores == "sigmoid":
        return jax.nn.sigmoid(out)
    return jax.nn.softmax(out, axis=-1) if scores == "softmax" else out


def _token_logprobs(params: Any, tokens: jax.Array, cfg: ModelConfig, kernels: Kernels) -> jax.Array:
    """tokens [B, T] -> [B, T - 1]: log p(tokens[:, t + 1] | tokens[:, :t + 1]) under a decoder (scoring).

    Recompiles per (B, T) bucket."""
    logits = _full_logits(params, tokens, cfg, kernels)[:, :-1].astype(jnp.float32)  # [B, T-1, V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


# The programs that write KV pages in place and then read them (attention) in the same layer loop. XLA:CPU's
# default copy insertion keeps the in-place update only when no fusion reads the pool before the write; in
# the partitioned (devices > 1) programs the fuser folds the V write into the attention's first page gather,
# and copy insertion then copied the whole pool twice per layer per step, which made sharded decode tens of
# times slower. Region analysis proves the reads come first and drops the copies; one device is unchanged
# (benchmarks/sharded.py, docs/MEASUREMENTS.md; tests/test_sharding.py checks the HLO). It is an XLA:CPU
# setting in the DebugOptions every backend parses; no GPU compile has been run with it yet.
CACHE_WRITER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


def _jit(fn: Any, **options: Any) -> Any:
    # A fresh callable per jit: JAX keys its trace and executable caches on the function, weakly, so the
    # programs compiled for this wrapper are freed when it is.
    return jax.jit(functools.partial(fn), **options)


class Programs:
    """The jit sites, compiled for one owner (a ModelRunner or EncoderRunner, corejax/serving/runner.py) and freed
    with it.

    Each XLA CPU executable keeps its machine code mapped, a few memory mappings per fused kernel
    (docs/MEASUREMENTS.md), and Linux allows a process 65,530. Module-level jitted functions would keep
    every program ever compiled for as long as the process lives, so a notebook loading model after model
    (or a long test session) would run out of mappings and crash inside XLA's compiler. A second runner of the
    same model recompiles, served by the persistent compilation cache."""

    def __init__(self) -> None:
        self.prefill = _jit(_prefill, static_argnames=("cfg", "kernels"), donate_argnames=("cache",),
                            compiler_options=CACHE_WRITER_OPTIONS)
        self.decode_step = _jit(_decode_step, static_argnames=("cfg", "kernels"),
                                donate_argnames=("cache", "penalties"), compiler_options=CACHE_WRITER_OPTIONS)
        self.copy_page = _jit(_copy_page, donate_argnames=("cache",), compiler_options=CACHE_WRITER_OPTIONS)
        self.full_logits = _jit(_full_logits, static_argnames=("cfg", "kernels"))
        self.encode = _jit(_encode, static_argnames=("cfg", "kernels", "output", "normalize", "scores", "dense"))
        self.token_logprobs = _jit(_token_logprobs, static_argnames=("cfg", "kernels"))


# Shared programs for one-off calls (tests, benchmarks): never freed, so not for serving.
_SHARED = Programs()


def full_logits(params: Any, tokens: Any, cfg: ModelConfig, kernels: Kernels | None = None) -> jax.Array:
    """tokens [B, T] -> logits [B, T, V] with this process's kernels (Kernels.detect) unless told otherwise."""
    return _SHARED.full_logits(params, tokens, cfg=cfg, kernels=kernels if kernels is not None else Kernels.detect())
