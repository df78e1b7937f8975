"""Speculative decoding: draft proposers (prompt n-gram lookup, a draft model), the acceptance rule, adaptive k.

A proposer drafts k tokens; the target model scores the row's last token plus the k drafts in one forward
(`Engine.programs.decode_step` with T = k + 1, over the paged KV cache) and draws a sample at every position;
the scheduler keeps the drafts up to the first one that differs from its position's sample, plus that sample.
The KV written for rejected drafts is rolled back (`PageAllocator.truncate`).

Why this is exact rejection sampling. Both proposers are deterministic: the draft distribution at each
position is a point mass q = δ(d). The rule of Leviathan et al. 2023 / Chen et al. 2023 — accept d with
probability min(1, p(d) / q(d)) = p(d), else draw from norm(max(0, p - q)), which is p conditioned on x ≠ d —
is exactly what "draw x ~ p, accept iff x == d" does: P(accept) = p(d), and a rejected draw is distributed as
p given x ≠ d. p is the row's full sampling distribution (top-k/top-p/min-p/temperature, corejax/sampling.py)
and x is drawn with the row's own noise for that output position, which depends only on (seed, position,
token id). So speculative text is not just distributed like the target's: it is token for token the text
plain decoding produces with the same seed, and greedy output is identical to plain greedy.
(A sampled, non-deterministic draft would accept more often on high-entropy text; with the models this
project ships, drafting greedily keeps one code path and the identity above.)

Adaptive k. Per request, an exponential average of the acceptance rate a gives the expected tokens per
verify, (1 - a^(k+1)) / (1 - a), against the verify's measured cost in plain decode steps plus, for a
draft model, its own measured cost per drafted token; k is the argmax (`best_k`). k = 0 turns speculation
off for the request, and it is re-probed with k = 1 every PROBE_EVERY steps, so a draft that stops matching
costs little (free generation stays near plain decoding speed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from corejax.engine import MIN_PREFILL_BUCKET, bucket
from corejax.config import SpeculativeConfig
from corejax.errors import CacheFullError
from corejax.sampling import SamplingParams, SamplingTensors

# What a verify over T = k + 1 positions costs, in plain decode steps, until the scheduler has timed its own
# steps (it then uses its measurements, `Scheduler._relative_cost`). Measured with SmolLM2 (B = 1, f32) on
# this CPU: with XLA's dot, T = 2, 4, 8 took 1.36, 1.29, 1.65 steps (any T > 1 leaves XLA's one-row GEMV
# for a GEMM); with the native weight-streaming kernel (kernels/small_matmul.cc) 1.0, 1.0, 1.4. Since T is
# bucketed to a power of two, k is chosen among 2^i - 1 (1, 3, 7, 15): other values pay for padding.
VERIFY_BASE = 0.30
VERIFY_COST = 0.04
DRAFT_STEP_COST = 0.35  # a draft model's step, in target steps, until the scheduler has measured it
PROBE_EVERY = 16


def verify_cost(k: int) -> float:
    """Plain decode steps one verify of k drafted tokens costs (k = 0: a plain step)."""
    return 1.0 + (VERIFY_BASE + VERIFY_COST * k if k else 0.0)


class AdaptiveK:
    """The draft length of one request, chosen from its measured acceptance rate (see the module docstring).

    draft_cost: a draft model's cost per drafted token in target decode steps (0 for n-gram lookup); the
    scheduler replaces the prior with its own measurement."""

    def __init__(self, spec: SpeculativeConfig):
        self.spec = spec
        self.value = spec.k
        self.rate = 0.6  # prior before any measurement: optimistic enough to try k drafts at once
        self.draft_cost = DRAFT_STEP_COST if spec.method == "draft" else 0.0
        self._idle = 0

    def update(self, drafted: int, accepted: int, cost: Callable[[int], float] = verify_cost) -> None:
        """cost(k): a verify of k drafts in plain decode steps (the scheduler passes its measurements)."""
        if not self.spec.adaptive or drafted == 0:
            return
        # Each drafted position is one Bernoulli trial of the acceptance rate, counted up to the first reject.
        trials = min(accepted + 1, drafted)
        self.rate = 0.8 * self.rate + 0.2 * (accepted / trials)
        self.value = best_k(self.rate, self.spec.k, self.draft_cost, cost)

    def tick(self) -> int:
        """The k to use this step (k = 0 re-probes with 1 every PROBE_EVERY steps)."""
        if self.value > 0:
            return self.value
        self._idle += 1
        if self._idle >= PROBE_EVERY:
            self._idle = 0
            return 1
        return 0


def best_k(rate: float, k_max: int, draft_cost: float = 0.0, cost: Callable[[int], float] = verify_cost) -> int:
    """argmax over k in {0} and {2^i - 1 <= k_max} (k_max itself too) of expected tokens per step / cost."""
    a = min(max(rate, 0.0), 0.999)
    ks = sorted({0, k_max, *(2 ** i - 1 for i in range(1, 5) if 2 ** i - 1 <= k_max)})
    gains = [(1 - a ** (k + 1)) / (1 - a) / (cost(k) + draft_cost * k) for k in ks]
    return ks[int(np.argmax(gains))]


def ngram_propose(tokens: list[int], k: int, max_n: int, min_n: int) -> list[int]:
    """Prompt lookup decoding: find the latest earlier occurrence of the context's last n tokens (longest n
    first, max_n down to min_n) and propose the up to k tokens that followed it; [] when nothing matches."""
    ctx = np.asarray(tokens, np.int64)
    size = len(ctx)
    for n in range(max_n, min_n - 1, -1):
        if size <= n:
            continue
        windows = sliding_window_view(ctx[:-1], n)  # starts i <= size - 1 - n: a token follows every match
        hits = np.flatnonzero((windows == ctx[size - n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return ctx[start:start + k].tolist()
    return []


class Proposer(Protocol):
    def propose(self, rows: list[tuple[int, list[int], int]]) -> list[list[int]]: ...

    def rollback(self, rid: int, length: int) -> None: ...

    def release(self, rid: int) -> None: ...


class DraftModelProposer:
    """Greedy drafts from a second model that shares the target's tokenizer, over its own paged KV cache.

    Per request it keeps a sequence whose KV trails the target's context; each round it prefills what it has
    not seen (the tokens accepted since, in one batched call for all rows), then decodes k - 1 more tokens
    batched across rows, and after verification rolls back to the accepted prefix."""

    def __init__(self, engine: Any):
        self.engine = engine
        self._seqs: set[int] = set()

    def propose(self, rows: list[tuple[int, list[int], int]]) -> list[list[int]]:
        eng = self.engine
        alloc, ps, chunk = eng.allocator, eng.engine_cfg.page_size, eng.engine_cfg.prefill_chunk
        live: list[tuple[int, list[int], int, int]] = []  # (rid, tokens, k, tokens already in the draft's KV)
        for rid, tokens, k in rows:
            try:
                if rid in self._seqs:
                    have = alloc.num_tokens(rid)
                    alloc.append(rid, tokens[have:])
                else:
                    have = alloc.allocate(rid, tokens, reuse=eng.engine_cfg.prefix_cache)
                    self._seqs.add(rid)
            except CacheFullError:
                self.release(rid)
                continue
            live.append((rid, tokens, k, have))
        if not live:
            return [[] for _ in rows]
        k_max = max(k for _, _, k, _ in live)
        width = bucket(max(-(-(len(t) + k_max) // ps) for _, t, _, _ in live), 16)
        # Catch up: long pending spans (a new request's prompt) in chunks of their own, the rest batched.
        pending = []
        for rid, tokens, _, have in live:
            while len(tokens) - have > chunk:
                self._prefill([rid], [tokens[have:have + chunk]], [have], width, sample=False)
                have += chunk
            pending.append((tokens[have:], have))
        greedy = SamplingTensors.from_params([SamplingParams(temperature=0.0)] * len(live), eng.cfg.vocab_size,
                                             batch_size=bucket(len(live), 1))
        first = self._prefill([r for r, *_ in live], [p for p, _ in pending], [h for _, h in pending], width,
                              sample=True, sampling=greedy)
        drafts = [[int(t)] for t in first[:len(live)]]
        b = bucket(len(live), 1)
        keys = np.zeros((b, 2), np.uint32)
        for j in range(1, k_max):
            tokens = np.zeros((b, 1), np.int32)
            positions = np.zeros((b, 1), np.int32)
            lengths = np.zeros((b,), np.int32)
            for i, (rid, ctx, _, _) in enumerate(live):
                alloc.append(rid, [drafts[i][-1]])
                tokens[i, 0] = drafts[i][-1]
                positions[i, 0] = len(ctx) + j - 1
                lengths[i] = len(ctx) + j
            table = np.zeros((b, width), np.int32)
            table[:len(live)] = alloc.page_table([r for r, *_ in live], width)
            out, eng.cache, _ = eng.programs.decode_step(eng.params, tokens, positions,
                                                         eng.cache.with_rows(table, lengths), greedy, None, keys,
                                                         np.zeros((b,), np.int32), cfg=eng.cfg)
            for i, t in enumerate(np.asarray(out.tokens)[:len(live), 0]):
                drafts[i].append(int(t))
        by_rid = {rid: d[:k] for (rid, _, k, _), d in zip(live, drafts)}
        return [by_rid.get(rid, []) for rid, _, _ in rows]

    def _prefill(self, rids: list[int], parts: list[list[int]], starts: list[int], width: int, *, sample: bool,
                 sampling: Any = None) -> np.ndarray | None:
        eng = self.engine
        b = bucket(len(rids), 1) if sample else len(rids)
        t = bucket(max(len(p) for p in parts), MIN_PREFILL_BUCKET)
        tokens = np.zeros((b, t), np.int32)
        positions = np.zeros((b, t), np.int32)
        lengths = np.zeros((b,), np.int32)
        last = np.zeros((b,), np.int32)
        for i, (part, start) in enumerate(zip(parts, starts)):
            tokens[i, :len(part)] = part
            positions[i] = np.arange(start, start + t)
            lengths[i] = start + len(part)
            last[i] = len(part) - 1
        table = np.zeros((b, width), np.int32)
        table[:len(rids)] = eng.allocator.page_table(rids, width)
        extra = dict(sampling=sampling, keys=np.zeros((b, 2), np.uint32)) if sample else {}
        out, eng.cache = eng.programs.prefill(eng.params, tokens, positions, last,
                                              eng.cache.with_rows(table, lengths), cfg=eng.cfg, **extra)
        return np.asarray(out.tokens) if sample else None

    def rollback(self, rid: int, length: int) -> None:
        if rid in self._seqs:
            alloc = self.engine.allocator
            alloc.truncate(rid, min(length, alloc.num_tokens(rid)))

    def release(self, rid: int) -> None:
        if rid in self._seqs:
            self._seqs.discard(rid)
            self.engine.allocator.free(rid)
