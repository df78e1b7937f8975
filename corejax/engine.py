"""The jit sites (prefill, decode step, full-sequence logits) and the host loop that drives them for one request.

What recompiles: a new ModelConfig, a new prompt-length bucket or cache-length bucket (powers of two),
and a change of the sampler's static flags (greedy vs sampling, top-k bound, logprobs count). Values of
temperature, top-p, seeds, positions and tokens are traced and never recompile.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from corejax import models
from corejax.cache import DenseKVCache
from corejax.config import ModelConfig
from corejax.errors import ContextLengthError
from corejax.sampling import (
    PenaltyState,
    SampleOutput,
    SamplingParams,
    SamplingTensors,
    init_penalty_state,
    request_keys,
    sample,
    update_penalty_state,
)

MIN_PREFILL_BUCKET = 16
MIN_CACHE_BUCKET = 256


def bucket(n: int, minimum: int) -> int:
    """Smallest power of two >= max(n, minimum): few distinct shapes, so few compiles."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def prefill(params: Any, tokens: jax.Array, positions: jax.Array, last: jax.Array, cache: Any,
            sampling: SamplingTensors, keys: jax.Array, cfg: ModelConfig
            ) -> tuple[SampleOutput, Any, PenaltyState | None]:
    """tokens, positions [B, T] (right-padded); last [B] index of each row's last real token.

    Runs the prompt through the model, writes its KV, and samples the first new token from the logits at
    `last` (only those rows of the LM head are computed)."""
    hidden, cache = models.forward(params, tokens, positions, cache, cfg)
    hidden_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)  # [B, 1, D]
    logits = models.lm_head(params, hidden_last, cfg)[:, 0]
    penalties = init_penalty_state(tokens, last + 1, cfg.vocab_size) if sampling.any_penalty else None
    out = sample(logits, sampling, penalties, keys, 0)
    if penalties is not None:
        penalties = update_penalty_state(penalties, out.tokens)
    return out, cache, penalties


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache", "penalties"))
def decode_step(params: Any, tokens: jax.Array, positions: jax.Array, cache: Any, sampling: SamplingTensors,
                penalties: PenaltyState | None, keys: jax.Array, step: jax.Array, cfg: ModelConfig
                ) -> tuple[SampleOutput, Any, PenaltyState | None]:
    """tokens, positions [B]: one new token per row -> the next token per row."""
    hidden, cache = models.forward(params, tokens[:, None], positions[:, None], cache, cfg)
    logits = models.lm_head(params, hidden, cfg)[:, 0]
    out = sample(logits, sampling, penalties, keys, step)
    if penalties is not None:
        penalties = update_penalty_state(penalties, out.tokens)
    return out, cache, penalties


@functools.partial(jax.jit, static_argnames=("cfg",))
def full_logits(params: Any, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """tokens [B, T] -> logits [B, T, V] from one forward over a fresh cache (tests, scoring)."""
    batch, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
    cache = DenseKVCache.create(cfg, batch, t)
    hidden, _ = models.forward(params, tokens, positions, cache, cfg)
    return models.lm_head(params, hidden, cfg)


@dataclasses.dataclass
class TokenEvent:
    """One generated token, as the host loop yields it."""

    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclasses.dataclass
class StepTimes:
    start: float = 0.0
    first_token: float = 0.0
    last_token: float = 0.0
    generated: int = 0


class Engine:
    """Holds one model's params and config; runs single requests through the jitted prefill and decode."""

    def __init__(self, cfg: ModelConfig, params: Any):
        self.cfg = cfg
        self.params = params

    def check_fits(self, prompt_len: int) -> None:
        if prompt_len == 0:
            raise ContextLengthError("the prompt is empty after tokenization; give at least one token")
        if prompt_len >= self.cfg.max_context:
            raise ContextLengthError(
                f"the prompt is {prompt_len} tokens but the model's context is {self.cfg.max_context}; "
                "shorten the prompt (leave room for the answer)"
            )

    def generate(self, prompt: list[int], sp: SamplingParams, stop_ids: frozenset[int],
                 times: StepTimes | None = None) -> Iterator[TokenEvent]:
        """Yields tokens until max_tokens, a stop id (yielded, then the loop ends) or the context is full.

        Each decode step is dispatched before the previous token is read back, so the host's work on a
        token (detokenizing, stop strings) overlaps the device's next step."""
        times = times or StepTimes()
        times.start = time.perf_counter()
        n = len(prompt)
        self.check_fits(n)
        max_new = min(sp.max_tokens, self.cfg.max_context - n)
        t_bucket = bucket(n, MIN_PREFILL_BUCKET)
        cache_len = min(bucket(n + max_new, MIN_CACHE_BUCKET), self.cfg.max_context)
        cache = DenseKVCache.create(self.cfg, 1, cache_len)
        tokens = np.zeros((1, t_bucket), np.int32)
        tokens[0, :n] = prompt
        positions = np.arange(t_bucket, dtype=np.int32)[None]
        sampling = SamplingTensors.from_params([sp], self.cfg.vocab_size)
        keys = request_keys([sp])
        out, cache, penalties = prefill(self.params, tokens, positions, np.array([n - 1], np.int32), cache,
                                        sampling, keys, cfg=self.cfg)
        for i in range(max_new):
            pending = None
            if i + 1 < max_new:
                pending = decode_step(self.params, out.tokens, np.array([n + i], np.int32), cache, sampling,
                                      penalties, keys, np.int32(i + 1), cfg=self.cfg)
            event = _to_event(out, sp)
            now = time.perf_counter()
            if i == 0:
                times.first_token = now
            times.last_token = now
            times.generated = i + 1
            yield event
            if event.token in stop_ids and not sp.ignore_eos:
                return
            if pending is None:
                return
            out, cache, penalties = pending


def _to_event(out: SampleOutput, sp: SamplingParams) -> TokenEvent:
    token = int(out.tokens[0])
    if sp.logprobs is None:
        return TokenEvent(token)
    top = list(zip(np.asarray(out.top_ids[0, :sp.logprobs]).tolist(),
                   np.asarray(out.top_logprobs[0, :sp.logprobs]).tolist()))
    return TokenEvent(token, float(out.logprob[0]), top)
