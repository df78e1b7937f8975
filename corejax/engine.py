"""The jit sites (prefill chunk, decode step, full-sequence logits, page copy, encoder batch, token scoring)
and the host loop that drives them for one request over the paged KV cache.

What recompiles: a new ModelConfig, a new prompt-chunk bucket or page-table width (powers of two), the
first chunk vs the final (sampling) chunk, and a change of the sampler's static flags (greedy vs sampling,
top-k bound, logprobs count, penalties). Values of temperature, top-p, seeds, positions, tokens, page
tables and lengths are traced and never recompile.
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
from corejax.models import bert
from corejax.cache import DenseKVCache, PagedKVCache
from corejax.config import EncoderConfig, EngineConfig, ModelConfig
from corejax.errors import ContextLengthError
from corejax.paging import PageAllocator
from corejax.sampling import (
    PenaltyState,
    SampleOutput,
    SamplingParams,
    SamplingTensors,
    request_keys,
    sample,
    update_penalty_state,
)

MIN_PREFILL_BUCKET = 16


def bucket(n: int, minimum: int) -> int:
    """Smallest power of two >= max(n, minimum): few distinct shapes, so few compiles."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def prefill(params: Any, tokens: jax.Array, positions: jax.Array, last: jax.Array, cache: Any, cfg: ModelConfig,
            sampling: SamplingTensors | None = None, penalties: PenaltyState | None = None,
            keys: jax.Array | None = None) -> tuple[SampleOutput | None, Any]:
    """One prompt chunk: tokens, positions [B, T] (right-padded); last [B] index of each row's last real token.

    Writes the chunk's KV. With `sampling` (the prompt's final chunk) it also samples the first new token
    from the logits at `last` — only those rows of the LM head are computed."""
    hidden, cache = models.forward(params, tokens, positions, cache, cfg)
    if sampling is None:
        return None, cache
    hidden_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)  # [B, 1, D]
    logits = models.lm_head(params, hidden_last, cfg)[:, 0]
    return sample(logits, sampling, penalties, keys, 0), cache


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache", "penalties"))
def decode_step(params: Any, tokens: jax.Array, positions: jax.Array, cache: Any, sampling: SamplingTensors,
                penalties: PenaltyState | None, keys: jax.Array, step: jax.Array, cfg: ModelConfig
                ) -> tuple[SampleOutput, Any, PenaltyState | None]:
    """tokens, positions [B]: the last sampled token of each row -> the next token."""
    if penalties is not None:
        penalties = update_penalty_state(penalties, tokens)  # the fed-in token is now part of the output
    hidden, cache = models.forward(params, tokens[:, None], positions[:, None], cache, cfg)
    logits = models.lm_head(params, hidden, cfg)[:, 0]
    return sample(logits, sampling, penalties, keys, step), cache, penalties


@functools.partial(jax.jit, donate_argnames=("cache",))
def copy_page(cache: PagedKVCache, src: jax.Array, dst: jax.Array) -> PagedKVCache:
    """Copy-on-write of one KV page in every layer (a page shared with a fork is about to change)."""
    return cache.copy_page(src, dst)


@functools.partial(jax.jit, static_argnames=("cfg",))
def full_logits(params: Any, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """tokens [B, T] -> logits [B, T, V] from one forward over a fresh cache (tests, scoring)."""
    batch, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
    cache = DenseKVCache.create(cfg, batch, t)
    hidden, _ = models.forward(params, tokens, positions, cache, cfg)
    return models.lm_head(params, hidden, cfg)


@functools.partial(jax.jit, static_argnames=("cfg", "output", "normalize"))
def encode(params: Any, tokens: jax.Array, lengths: jax.Array, cfg: EncoderConfig, output: str,
           normalize: bool) -> jax.Array:
    """Encoder batch: tokens [B, T] right-padded, lengths [B] -> pooled vectors [B, D] (output "mean", "cls",
    "max"; L2-normalised if `normalize`) or classifier logits [B, L] (output "logits").

    Recompiles per (B, T) bucket (corejax/encode.py pads both to powers of two) and per static argument."""
    hidden = bert.encode(params, tokens, lengths, cfg)
    if output == "logits":
        return bert.classifier_logits(params, hidden)
    pooled = bert.pool(hidden, lengths, output)
    return bert.l2_normalize(pooled) if normalize else pooled


@functools.partial(jax.jit, static_argnames=("cfg",))
def token_logprobs(params: Any, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """tokens [B, T] -> [B, T - 1]: log p(tokens[:, t + 1] | tokens[:, :t + 1]) under a decoder (scoring).

    Recompiles per (B, T) bucket."""
    logits = full_logits(params, tokens, cfg)[:, :-1].astype(jnp.float32)  # [B, T-1, V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


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
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class Engine:
    """One model's params, its KV page pool and the host allocator that assigns the pages.

    Requests run one at a time here (continuous batching is the scheduler's job); pages of finished
    requests stay cached, so a prompt that starts like an earlier one reuses that KV (prefix caching)."""

    def __init__(self, cfg: ModelConfig, params: Any, engine_cfg: EngineConfig | None = None):
        self.cfg = cfg
        self.params = params
        self.engine_cfg = engine_cfg or EngineConfig()
        ec = self.engine_cfg
        num_pages = ec.num_pages(cfg)
        self.allocator = PageAllocator(num_pages, ec.page_size)
        self.cache = PagedKVCache.create(cfg, num_pages, ec.page_size, ec.kv_dtype)
        self._next_seq = 0

    @property
    def kv_cache_bytes(self) -> int:
        leaves = jax.tree_util.tree_leaves((self.cache.k_pages, self.cache.v_pages, self.cache.k_scales,
                                            self.cache.v_scales))
        return sum(int(x.size) * x.dtype.itemsize for x in leaves)

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
        """Yields tokens until max_tokens, a stop id (yielded, then the loop ends) or the context is full."""
        times = times or StepTimes()
        times.start = time.perf_counter()
        n = len(prompt)
        self.check_fits(n)
        max_new = min(sp.max_tokens, self.cfg.max_context - n)
        ps, chunk = self.engine_cfg.page_size, self.engine_cfg.prefill_chunk
        seq = self._next_seq
        self._next_seq += 1
        reused = self.allocator.allocate(seq, prompt, reuse=self.engine_cfg.prefix_cache)
        times.cached_tokens = reused
        width = bucket(-(-(n + max_new) // ps), 16)  # page-table columns: a few shapes, few compiles
        sampling = SamplingTensors.from_params([sp], self.cfg.vocab_size)
        keys = request_keys([sp])
        penalties = initial_penalties(prompt, self.cfg.vocab_size) if sampling.any_penalty else None
        cache = self.cache
        try:
            out = None
            for start in range(reused, n, chunk):
                part = prompt[start:start + chunk]
                t_bucket = bucket(len(part), MIN_PREFILL_BUCKET)
                tokens = np.zeros((1, t_bucket), np.int32)
                tokens[0, :len(part)] = part
                positions = np.arange(start, start + t_bucket, dtype=np.int32)[None]
                rows = cache.with_rows(self.allocator.page_table([seq], width),
                                       np.array([start + len(part)], np.int32))
                final = start + chunk >= n
                out, cache = prefill(self.params, tokens, positions, np.array([len(part) - 1], np.int32), rows,
                                     cfg=self.cfg, **(dict(sampling=sampling, penalties=penalties, keys=keys)
                                                      if final else {}))
            for i in range(max_new):
                event = _to_event(out, sp)
                now = time.perf_counter()
                if i == 0:
                    times.first_token = now
                times.last_token = now
                times.generated = i + 1
                yield event
                if (event.token in stop_ids and not sp.ignore_eos) or i + 1 == max_new:
                    return
                for c in self.allocator.append(seq, [event.token]):
                    cache = copy_page(cache, np.int32(c.src), np.int32(c.dst))
                rows = cache.with_rows(self.allocator.page_table([seq], width), np.array([n + i + 1], np.int32))
                out, cache, penalties = decode_step(self.params, out.tokens, np.array([n + i], np.int32), rows,
                                                    sampling, penalties, keys, np.int32(i + 1), cfg=self.cfg)
        finally:
            self.cache = cache
            self.allocator.free(seq)


def initial_penalties(prompt: list[int], vocab_size: int) -> PenaltyState:
    """Penalty state of one row from its prompt (host-built: the prompt may span several prefill chunks)."""
    seen = np.zeros((1, vocab_size), bool)
    seen[0, np.asarray(prompt, np.int64)] = True
    return PenaltyState(counts=jnp.zeros((1, vocab_size), jnp.int32), seen=jnp.asarray(seen))


def _to_event(out: SampleOutput, sp: SamplingParams) -> TokenEvent:
    token = int(out.tokens[0])
    if sp.logprobs is None:
        return TokenEvent(token)
    top = list(zip(np.asarray(out.top_ids[0, :sp.logprobs]).tolist(),
                   np.asarray(out.top_logprobs[0, :sp.logprobs]).tolist()))
    return TokenEvent(token, float(out.logprob[0]), top)
