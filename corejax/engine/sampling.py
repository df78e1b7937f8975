"""The jittable sampler (logits -> tokens) and its per-row inputs: SamplingParams as tensors, penalties, masks.

Order of the transforms (llama.cpp's default chain, without typical-p):

    penalties -> top-k -> top-p -> min-p -> temperature -> Gumbel-max draw

Why this order rather than vLLM's (temperature before truncation):
  * The kept set does not depend on the temperature: temperature only reshapes the distribution over the
    tokens that top-k/top-p/min-p let through, so "top_p=0.9" means the same set at T=0.3 and at T=1.5.
  * top-k first lets top-p run on the k sorted survivors that `lax.top_k` already returns, so the common
    default (top_k=40, top_p=0.95, min_p=0.05) never sorts the vocabulary.
  * min-p compares p_i with p_max, i.e. l_i >= l_max + log(min_p); before temperature that is one compare.
Each truncation's probabilities are those of the tokens still kept (top-p's nucleus is a share of the mass
that top-k left), as in llama.cpp.

Semantics of each transform, per row:
  * repetition_penalty r (HF/llama.cpp): over tokens seen in the prompt or the output, l > 0 -> l / r,
    l <= 0 -> l * r. Then frequency/presence (OpenAI/vLLM), over output tokens only:
    l -= frequency_penalty * count + presence_penalty * (count > 0). Then logit_bias (OpenAI): l += bias, where
    a bias of -100 sets l = -inf, so a banned token is never drawn however far its logit leads (a plain -100
    would not outweigh a logit lead of 100); +100 outweighs any real lead, so it forces the token.
  * top_k = k > 0: exactly the k largest logits; equal logits are ordered by token id (lower first), as
    `lax.top_k` and `argmax` do, so top_k=1 is greedy even under ties.
  * top_p = p < 1: the smallest set {l >= t} whose probability is >= p; every token tied with the cut-off
    logit is kept, so the set never depends on how a sort broke a tie.
  * min_p = m > 0: keep l >= l_max + log(m) (ties with the bound kept).
  * temperature T: rows with T < 1e-5 are greedy (argmax of the penalised logits, as vLLM does); other
    rows draw argmax(l / T + g) over the kept tokens, g ~ Gumbel(0, 1), i.e. an exact sample of
    softmax(l / T) renormalised over the kept set.
  * The reported logprob is log_softmax of the *unprocessed* logits at the chosen token (vLLM's default
    "raw" logprobs); top_ids/top_logprobs are the n largest of those, sorted descending.

Randomness. Each row has its own key ([2] uint32 threefry key data, `request_key(seed)`); at step s the row
uses fold_in(key, s) and the Gumbel noise of token id i is threefry2x32(fold_in(key, s), (0, i)). The noise
of a token therefore depends only on (seed, step, token id) -- not on the batch, its size, its other rows,
or whether this row is sampled in the top-k candidate space or over the whole vocabulary -- so a seed gives
the same tokens whoever shares the batch. Pass `step` per row (the row's own output position) so that the
tokens do not depend on when the request was admitted either. Caveat: top-p sums probabilities; when the
batch's static flags differ (another row forces the full-vocabulary path) that sum is taken in another order,
and a token whose cumulative mass lies within float rounding of top_p could be cut differently.

Static vs traced (see SamplingTensors): the per-row values (temperature, top_k, top_p, min_p, penalties) are
traced [B] arrays -- changing them never recompiles. from_params sets the static flags to a few fixed variants,
so a new command-line flag does not compile a new program: greedy and the default settings (top_k <= 64) share
the top-k candidate program, in which an all-greedy batch takes the argmax branch of a lax.cond at run time;
top_p and min_p are applied there as values (1 and 0 are no-ops). What selects another program: top_k = 0
with top_p < 1 (the full-vocabulary path), top_k > 64 (a power-of-two bound), penalties (their [B, V] state),
and logprobs (none, the chosen token's only, or the top MAX_LOGPROBS, of which each row keeps its own count).

Cost: a sampling call is a fraction of a millisecond with top-k candidates, several with the full-vocabulary
path (top_k=0, top_p < 1); docs/MEASUREMENTS.md has the figures.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax
from jax.extend.random import threefry2x32_p

from corejax.types.options import GREEDY_EPS, LOGIT_BIAS_LIMIT, MAX_LOGPROBS, SamplingParams
from corejax.errors import InvalidParameterError

def request_key(seed: int | None) -> np.ndarray:
    """[2] uint32 threefry key data for one request (a fresh random one when seed is None).

    For seed < 2**32 this equals jax.random.PRNGKey(seed); larger seeds use the high 32 bits too.
    """
    if seed is None:
        seed = secrets.randbits(64)
    return np.array([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], dtype=np.uint32)


def request_keys(params: Sequence[SamplingParams]) -> np.ndarray:
    """[B, 2] uint32: one request_key per row. Build once at admission and keep it with the request."""
    return np.stack([request_key(p.seed) for p in params]) if params else np.zeros((0, 2), np.uint32)


# ----------------------------------------------------------------------------------------------------
# Device-side tensors


MIN_TOP_K_BOUND = 64  # candidates of the top-k program: the default top_k = 40, and greedy rows, fit


def _bucket(k: int, vocab_size: int) -> int:
    return min(vocab_size, max(MIN_TOP_K_BOUND, 1 << max(0, k - 1).bit_length()))


@struct.dataclass
class SamplingTensors:
    """Per-row sampling values as [B] arrays (traced) plus the static flags that pick the code path."""

    temperature: jax.Array         # [B] f32; < GREEDY_EPS means greedy
    top_k: jax.Array               # [B] int32; 0 = off
    top_p: jax.Array               # [B] f32; 1 = off
    min_p: jax.Array               # [B] f32; 0 = off
    repetition_penalty: jax.Array  # [B] f32; 1 = off
    presence_penalty: jax.Array    # [B] f32
    frequency_penalty: jax.Array   # [B] f32
    # Static: changing any of these recompiles the step that calls sample().
    any_sampling: bool = struct.field(pytree_node=False, default=False)  # some row has T >= eps
    any_penalty: bool = struct.field(pytree_node=False, default=False)
    top_k_bound: int = struct.field(pytree_node=False, default=0)  # static K of lax.top_k; 0 = none
    all_top_k: bool = struct.field(pytree_node=False, default=False)  # every sampling row has top_k > 0
    needs_full_top_p: bool = struct.field(pytree_node=False, default=False)  # top-p over all of V
    any_top_p: bool = struct.field(pytree_node=False, default=False)
    any_min_p: bool = struct.field(pytree_node=False, default=False)
    max_logprobs: int | None = struct.field(pytree_node=False, default=None)  # None = no logprobs

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams], vocab_size: int,
                    batch_size: int | None = None) -> SamplingTensors:
        """Rows for `params`, padded with greedy rows up to batch_size (default len(params))."""
        b = len(params) if batch_size is None else batch_size
        if b < len(params):
            raise InvalidParameterError(f"batch_size must be >= len(params) = {len(params)}; got {b}")
        rows = list(params) + [SamplingParams(temperature=0.0)] * (b - len(params))
        sampling = [p for p in rows if not p.greedy]
        # Static flags in a few fixed variants (module docstring): greedy rows and the default settings share
        # the top-k candidate program; only top_k = 0 with top_p < 1, top_k > 64, penalties and logprobs differ.
        all_top_k = all(p.top_k > 0 for p in sampling)
        max_k = max((min(p.top_k, vocab_size) for p in sampling), default=0)
        lp = [p.logprobs for p in rows if p.logprobs is not None]
        f32 = lambda name: np.array([getattr(p, name) for p in rows], np.float32)  # noqa: E731
        return cls(
            temperature=f32("temperature"),
            top_k=np.array([min(p.top_k, vocab_size) for p in rows], np.int32),
            top_p=f32("top_p"),
            min_p=f32("min_p"),
            repetition_penalty=f32("repetition_penalty"),
            presence_penalty=f32("presence_penalty"),
            frequency_penalty=f32("frequency_penalty"),
            any_sampling=True,  # whether a row samples is decided at run time (lax.cond in sample())
            any_penalty=any(p.repetition_penalty != 1.0 or p.presence_penalty != 0.0
                            or p.frequency_penalty != 0.0 or p.logit_bias for p in rows),
            top_k_bound=_bucket(max_k, vocab_size) if all_top_k or max_k > 0 else 0,
            all_top_k=all_top_k,
            needs_full_top_p=any(p.top_k == 0 and p.top_p < 1.0 for p in sampling),
            any_top_p=all_top_k or any(p.top_p < 1.0 for p in sampling),  # over candidates: runtime no-op at 1
            any_min_p=True,  # one compare; min_p = 0 keeps everything
            max_logprobs=None if not lp else MAX_LOGPROBS if max(lp) else 0,  # rows keep their own count
        )


@struct.dataclass
class PenaltyState:
    """What the penalties look at, per row."""

    counts: jax.Array  # [B, V] int32: how often each token occurs in the output so far
    seen: jax.Array    # [B, V] bool: token occurs in the prompt or the output
    bias: jax.Array | None = None  # [B, V] f32: logit_bias, added after the penalties (-inf: a banned token)


def penalty_state(rows: Sequence[tuple[Sequence[int], Sequence[int]]], batch: int, vocab_size: int,
                  params: Sequence[SamplingParams] = ()) -> PenaltyState:
    """The penalty state of a batch, built on the host: per row (tokens seen in the prompt or the output, output
    tokens to count) and its params' logit_bias; rows past len(rows) are padding. Built when a batch's rows
    change; the decode step then carries it on the device (update_penalty_state)."""
    seen = np.zeros((batch, vocab_size), bool)
    counts = np.zeros((batch, vocab_size), np.int32)
    bias = np.zeros((batch, vocab_size), np.float32)
    for b, (seen_ids, counted) in enumerate(rows):
        seen[b, np.asarray(seen_ids, np.int64)] = True
        np.add.at(counts[b], np.asarray(counted, np.int64), 1)
    for b, p in enumerate(params):
        for token, value in p.logit_bias:
            if token < vocab_size:  # the worker refuses ids outside the vocabulary before a request is queued
                bias[b, token] = -np.inf if value <= -LOGIT_BIAS_LIMIT else value
    return PenaltyState(counts=jnp.asarray(counts), seen=jnp.asarray(seen), bias=jnp.asarray(bias))


def update_penalty_state(state: PenaltyState, tokens: jax.Array,
                         active: jax.Array | None = None) -> PenaltyState:
    """Adds the sampled tokens [B] (rows where active [B] is False are left alone)."""
    b, v = state.counts.shape
    ids = tokens if active is None else jnp.where(active, tokens, v)
    rows = jnp.arange(b)
    return dataclasses.replace(
        state,
        counts=state.counts.at[rows, ids].add(1, mode="drop"),
        seen=state.seen.at[rows, ids].set(True, mode="drop"))


def apply_penalties(logits: jax.Array, t: SamplingTensors, state: PenaltyState) -> jax.Array:
    """[B, V] logits -> penalised logits (repetition, then frequency and presence)."""
    r = t.repetition_penalty[:, None]
    rep = jnp.where(logits > 0, logits / r, logits * r)
    logits = jnp.where(state.seen, rep, logits)
    counts = state.counts.astype(logits.dtype)
    return (logits - t.frequency_penalty[:, None] * counts
            - t.presence_penalty[:, None] * (counts > 0).astype(logits.dtype)
            + (0.0 if state.bias is None else state.bias))


@dataclasses.dataclass
class SamplingBatch:
    """The sampling half of a step's batch (corejax/serving/batch.py has the token half): per-row settings, keys and,
    when a row has penalties, their state."""

    tensors: SamplingTensors
    keys: np.ndarray                 # [B, 2] uint32: each row's request key
    penalties: PenaltyState | None

    @classmethod
    def build(cls, params: Sequence[SamplingParams], keys: Sequence[np.ndarray],
              histories: Sequence[tuple[Sequence[int], Sequence[int]]], batch: int, vocab_size: int) -> SamplingBatch:
        """Rows padded with greedy rows to `batch`; histories: per row (seen ids, counted ids), read only when
        some row has penalties."""
        tensors = SamplingTensors.from_params(list(params), vocab_size, batch_size=batch)
        key_rows = np.zeros((batch, 2), np.uint32)
        if len(keys):
            key_rows[:len(keys)] = keys
        return cls(tensors, key_rows,
                   penalty_state(histories, batch, vocab_size, params) if tensors.any_penalty else None)


# ----------------------------------------------------------------------------------------------------
# The sampler


@struct.dataclass
class SampleOutput:
    tokens: jax.Array        # [B] int32
    logprob: jax.Array       # [B] f32: raw log-softmax at tokens (0 when no row asked for logprobs)
    top_ids: jax.Array       # [B, n] int32, n = max_logprobs (0 when None)
    top_logprobs: jax.Array  # [B, n] f32, sorted descending

    def to_host(self, with_logprobs: bool) -> SampleOutput:
        """The arrays as numpy, each fetched once (every fetch of a device array has a fixed cost); the logprob
        arrays only when some row asked for them."""
        fetch = np.asarray if with_logprobs else (lambda x: x)  # noqa: E731
        return dataclasses.replace(self, tokens=np.asarray(self.tokens), logprob=fetch(self.logprob),
                                   top_ids=fetch(self.top_ids), top_logprobs=fetch(self.top_logprobs))

    def row(self, i: int) -> np.ndarray:
        """Row i's tokens [T] of a host output (T = 1 for a prefill's [B] tokens, the step's T for a decode
        step's [B, T])."""
        return np.asarray(self.tokens).reshape(np.shape(self.tokens)[0], -1)[i]

    def row_logprobs(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row i's (logprob [T], top_ids [T, n], top_logprobs [T, n]), from an output fetched with logprobs."""
        b, n = np.shape(self.tokens)[0], np.shape(self.top_ids)[-1]
        logprob = np.asarray(self.logprob).reshape(b, -1)
        t = logprob.shape[1]  # not from top_ids: with no alternatives asked for (n = 0) it has no elements
        return (logprob[i], np.asarray(self.top_ids).reshape(b, t, n)[i],
                np.asarray(self.top_logprobs).reshape(b, t, n)[i])


def _gumbel(row_keys: jax.Array, ids: jax.Array) -> jax.Array:
    """Gumbel(0, 1) noise [B, N] for token ids [B, N] (or [N]) of each row key [B, 2]: a function of
    (key, id) only, so it is the same in candidate space and over the whole vocabulary."""
    shape = (row_keys.shape[0], ids.shape[-1])
    k1 = jnp.broadcast_to(row_keys[:, :1], shape)
    k2 = jnp.broadcast_to(row_keys[:, 1:], shape)
    ids = jnp.broadcast_to(ids, shape).astype(jnp.uint32)
    bits, _ = threefry2x32_p.bind(k1, k2, jnp.zeros(shape, jnp.uint32), ids)
    u = ((bits >> 8).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1), never 0 or 1
    return -jnp.log(-jnp.log(u))


def _top_p_threshold_sorted(vals: jax.Array, keep: jax.Array, top_p: jax.Array) -> jax.Array:
    """Cut-off logit [B] for top-p over sorted-descending candidates vals [B, K] (kept where keep)."""
    e = jnp.where(keep, jnp.exp(vals - vals[:, :1]), 0.0)
    total = jnp.sum(e, axis=-1, keepdims=True)
    before = jnp.cumsum(e, axis=-1) - e  # mass strictly before each candidate
    inside = keep & (before < top_p[:, None] * total)
    t = jnp.min(jnp.where(inside, vals, jnp.inf), axis=-1)
    return jnp.where(top_p >= 1.0, -jnp.inf, t)


def _sortable(x: jax.Array) -> jax.Array:
    """Order-preserving map of f32 to uint32."""
    i = lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(i >> 31 == 1, ~i, i | jnp.uint32(0x80000000))


def _top_p_threshold_bisect(logits: jax.Array, keep: jax.Array, top_p: jax.Array) -> jax.Array:
    """Cut-off [B] as a sortable uint32 for top-p over all of V without sorting: the largest u such
    that the mass of {sortable(l) >= u} is >= top_p, found by 32 halvings of the uint32 range."""
    m = jnp.max(jnp.where(keep, logits, -jnp.inf), axis=-1, keepdims=True)
    e = jnp.where(keep, jnp.exp(logits - m), 0.0)
    target = top_p[:, None] * jnp.sum(e, axis=-1, keepdims=True)
    key = _sortable(logits)

    def body(_, lohi):
        lo, hi = lohi
        d = hi - lo
        mid = lo + (d >> 1) + (d & 1)
        ok = jnp.sum(jnp.where(key >= mid, e, 0.0), axis=-1, keepdims=True) >= target
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    b = logits.shape[0]
    lo = jnp.zeros((b, 1), jnp.uint32)
    hi = jnp.full((b, 1), 0xFFFFFFFF, jnp.uint32)
    lo, _ = lax.fori_loop(0, 32, body, (lo, hi))
    return jnp.where(top_p[:, None] >= 1.0, jnp.uint32(0), lo)[:, 0]


def _argmax(x: jax.Array) -> jax.Array:
    """First index of the maximum of each row [B, N] -> [B] int32, like jnp.argmax but as two plain
    reductions: XLA:CPU runs argmax's (value, index) reduce several times slower (docs/MEASUREMENTS.md).
    A row containing NaN gives N - 1."""
    n = x.shape[-1]
    m = jnp.max(x, axis=-1, keepdims=True)
    i = jnp.min(jnp.where(x == m, jnp.arange(n, dtype=jnp.int32), n), axis=-1)
    return jnp.minimum(i, n - 1)


def _top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """lax.top_k behind an optimization barrier: XLA lowers top_k to sort+slice and only turns that back
    into its fast TopK when the sort has a single slice user; a later vals[:, :1] folded into a second
    slice made it sort the whole vocabulary (tens of times slower on CPU; docs/MEASUREMENTS.md). One barrier per
    output, not one over the pair: XLA's SPMD partitioner (a model sharded over devices) fails on a barrier of
    a tuple."""
    vals, ids = lax.top_k(x, k)
    return lax.optimization_barrier(vals), lax.optimization_barrier(ids)


def _sample_rows(logits: jax.Array, t: SamplingTensors,
                 row_keys: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """Draws one token [B] per row from the truncated, tempered distribution (all rows sampled); also
    returns the argmax [B] when it came for free (the first top-k candidate), else None."""
    b, v = logits.shape
    temp = jnp.maximum(t.temperature, GREEDY_EPS)[:, None]
    log_min_p = jnp.log(t.min_p)[:, None]  # log(0) = -inf keeps everything
    if t.all_top_k:
        k_max = t.top_k_bound
        vals, ids = _top_k(logits, k_max)  # [B, K] sorted descending
        keep = jnp.arange(k_max)[None, :] < jnp.clip(t.top_k, 1, k_max)[:, None]
        if t.any_top_p:
            keep &= vals >= _top_p_threshold_sorted(vals, keep, t.top_p)[:, None]
        if t.any_min_p:
            keep &= vals >= vals[:, :1] + log_min_p
        scores = jnp.where(keep, vals / temp + _gumbel(row_keys, ids), -jnp.inf)
        choice = _argmax(scores)
        return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0], ids[:, 0]

    keep = jnp.ones((b, v), bool)
    t_sorted = None
    if t.top_k_bound:
        k_max = t.top_k_bound
        vals, ids = _top_k(logits, k_max)
        in_k = jnp.arange(k_max)[None, :] < jnp.clip(t.top_k, 1, k_max)[:, None]
        rows = jnp.broadcast_to(jnp.arange(b)[:, None], ids.shape)
        mask_k = jnp.zeros((b, v), bool).at[rows, ids].set(in_k)
        keep = jnp.where((t.top_k > 0)[:, None], mask_k, True)
        if t.any_top_p:
            t_sorted = _top_p_threshold_sorted(vals, in_k, t.top_p)
    if t.any_top_p:
        if t.needs_full_top_p:
            u = _top_p_threshold_bisect(logits, keep, t.top_p)
            keep_p = _sortable(logits) >= u[:, None]
            if t_sorted is not None:  # top-k rows: the same cut as in candidate space
                keep_p = jnp.where((t.top_k > 0)[:, None], logits >= t_sorted[:, None], keep_p)
            keep &= keep_p
        else:  # only rows with top_k > 0 use top-p
            keep &= logits >= t_sorted[:, None]
    if t.any_min_p:
        keep &= logits >= jnp.max(logits, axis=-1, keepdims=True) + log_min_p
    noise = _gumbel(row_keys, jnp.arange(v, dtype=jnp.uint32))
    scores = jnp.where(keep, logits / temp + noise, -jnp.inf)
    return _argmax(scores), None


def allowed(mask: jax.Array, vocab_size: int) -> jax.Array:
    """Token bitmask [B, W] int32 (bit i % 32 of word i // 32 set = token i allowed; llguidance's layout,
    corejax/serving/structured.py) -> [B, V] bool."""
    bits = lax.bitcast_convert_type(mask, jnp.uint32)
    words = jnp.repeat(bits, 32, axis=-1)[..., :vocab_size]
    shift = jnp.tile(jnp.arange(32, dtype=jnp.uint32), bits.shape[-1])[:vocab_size]
    return (words >> shift) & 1 == 1


def sample(logits: jax.Array, tensors: SamplingTensors, penalty_state: PenaltyState | None,
           keys: jax.Array, step: jax.Array | int, mask: jax.Array | None = None) -> SampleOutput:
    """Chooses the next token of each row. Jittable; the engine calls it inside its decode step.

    logits [B, V] (cast to f32); keys [B, 2] uint32 key data (request_keys) or [B] typed threefry keys;
    step: scalar or [B] int32, the row's output position (folded into its key). penalty_state may be
    None when tensors.any_penalty is False. mask: None, or a [B, W] token bitmask (structured output): masked
    tokens are never drawn: their logits become -inf after the penalties and before top-k/top-p/min-p, so
    those act on the allowed tokens only. Every row must allow at least one token (the scheduler
    ends a request whose grammar allows none). Reported logprobs stay the raw, unmasked ones.
    """
    raw = logits.astype(jnp.float32)
    b, v = raw.shape
    x = raw
    if tensors.any_penalty:
        if penalty_state is None:
            raise ValueError("sample(): tensors.any_penalty is set but penalty_state is None")
        x = apply_penalties(x, tensors, penalty_state)
    if mask is not None:
        x = jnp.where(allowed(mask, v), x, -jnp.inf)
    if tensors.any_sampling:
        if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
            keys = jax.random.key_data(keys)
        steps = jnp.broadcast_to(jnp.asarray(step, jnp.uint32), (b,))

        def sampled(x):
            row_keys = jax.vmap(jax.random.fold_in)(keys, steps)
            drawn, greedy = _sample_rows(x, tensors, row_keys)
            greedy = _argmax(x) if greedy is None else greedy
            return jnp.where(tensors.temperature < GREEDY_EPS, greedy, drawn).astype(jnp.int32)

        # Decided at run time, so greedy and sampled requests share one program: an all-greedy batch runs
        # only the argmax branch.
        tokens = lax.cond(jnp.any(tensors.temperature >= GREEDY_EPS), sampled, _argmax, x)
    else:
        tokens = _argmax(x)

    n = tensors.max_logprobs or 0
    if tensors.max_logprobs is None:
        logprob = jnp.zeros((b,), jnp.float32)
    else:
        lse = jax.nn.logsumexp(raw, axis=-1)
        logprob = jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0] - lse
    if n:
        top_vals, top_ids = _top_k(raw, n)
        top_logprobs = top_vals - lse[:, None]
    else:
        top_ids = jnp.zeros((b, 0), jnp.int32)
        top_logprobs = jnp.zeros((b, 0), jnp.float32)
    return SampleOutput(tokens=tokens, logprob=logprob, top_ids=top_ids.astype(jnp.int32),
                        top_logprobs=top_logprobs)
