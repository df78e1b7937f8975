"""Speculative decoding: draft proposers (prompt n-gram lookup, a draft model), the acceptance rule, adaptive k.

A proposer drafts k tokens; the target model scores the row's last token plus the k drafts in one forward
(the runner's decode step, `ModelRunner.decode` with T = k + 1, over the paged KV cache) and draws a sample at
every position;
the scheduler keeps the drafts up to the first one that differs from its position's sample, plus that sample.
The KV written for rejected drafts is rolled back (`PageAllocator.truncate`).

Why this is exact rejection sampling. Both proposers are deterministic: the draft distribution at each
position is a point mass q = δ(d). The rule of Leviathan et al. 2023 / Chen et al. 2023 — accept d with
probability min(1, p(d) / q(d)) = p(d), else draw from norm(max(0, p - q)), which is p conditioned on x ≠ d —
is exactly what "draw x ~ p, accept iff x == d" does: P(accept) = p(d), and a rejected draw is distributed as
p given x ≠ d. p is the row's full sampling distribution (top-k/top-p/min-p/temperature, corejax/engine/sampling.py)
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

import collections
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from corejax.serving.batch import MIN_PREFILL_BUCKET, StepBatch, bucket, table_width
from corejax.types.options import SpeculativeConfig
from corejax.errors import CacheFullError, CorejaxError
from corejax.engine.sampling import SamplingBatch
from corejax.types.options import SamplingParams

# What a verify over T = k + 1 positions costs, in plain decode steps, until the scheduler has timed its own
# steps (it then uses its measurements, `Scheduler._relative_cost`): a fixed part plus a little per draft, about
# what SmolLM2's verifies cost with XLA's dot (B = 1, f32; docs/MEASUREMENTS.md), which leaves its one-row GEMV
# for a GEMM at any T > 1; with the native weight-streaming kernel (kernels/small_matmul.cc) a few drafts cost
# about one plain step. Since T is bucketed to a power of two, k is chosen among 2^i - 1 (1, 3, 7, 15): other
# values pay for padding.
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
    """Drafts tokens for rows (request id, context tokens, k, the request's grammar matcher or None:
    structured output). `timed`: its own cost is worth measuring (a draft model's steps; n-gram lookup costs
    next to nothing). rollback/release keep its per-request state in step with the target's accepted text."""

    timed: bool

    def propose(self, rows: list[tuple[int, list[int], int, Any]]) -> list[list[int]]: ...

    def rollback(self, rid: int, length: int) -> None: ...

    def release(self, rid: int) -> None: ...


class NgramProposer:
    """Prompt lookup (ngram_propose) as a Proposer: stateless, so rollback and release have nothing to do."""

    timed = False

    def __init__(self, spec: SpeculativeConfig):
        self.max_n, self.min_n = spec.ngram_max, spec.ngram_min

    def propose(self, rows: list[tuple[int, list[int], int, Any]]) -> list[list[int]]:
        return [ngram_propose(tokens, k, self.max_n, self.min_n) for _, tokens, k, _ in rows]

    def rollback(self, rid: int, length: int) -> None:
        pass

    def release(self, rid: int) -> None:
        pass


def _ema(old: float | None, new: float, weight: float = 0.3) -> float:
    return new if old is None else (1 - weight) * old + weight * new


class Speculation:
    """The scheduler's speculative decoding: one proposer per kind of draft, the acceptance rule, adaptive k
    and the step-time measurements it is chosen from. The scheduler asks `drafts()` before a decode step, feeds
    each row its drafts, reports the step's time (`timed_step`) and hands each row's samples to `accept()`.

    draft_loader(spec) builds a draft-model proposer (the Runtime loads the draft model); n-gram proposers are
    made here."""

    def __init__(self, draft_loader: Callable[[SpeculativeConfig], Proposer] | None = None):
        self.draft_loader = draft_loader
        self.proposers: dict[tuple, Proposer] = {}
        self.plain_step: float | None = None  # seconds of a T = 1 decode step (estimated from verifies too)
        self._step_time: dict[tuple[int, int], float] = {}  # (B, T) bucket -> seconds per decode step
        self._seen: set[tuple] = set()  # shapes run once already (their compile is behind them)

    def drafts(self, rows: list[Any]) -> dict[int, list[int]]:
        """Drafted tokens per request id (none for rows that do not speculate or found nothing to propose).
        A draft never runs past the row's max_new, so prompt + max_new bounds every position written."""
        groups: dict[tuple, list[tuple[Any, int]]] = collections.defaultdict(list)
        for req in rows:
            if req.speculates:
                k = min(req.k.tick(), req.max_new - len(req.output) - 1)
                if k > 0:
                    groups[req.spec.proposer_key].append((req, k))
        out: dict[int, list[int]] = {}
        for key, group in groups.items():
            proposer = self._proposer(group[0][0].spec)
            started = time.perf_counter()
            proposed = proposer.propose([(r.rid, r.prompt + r.output, k, r.matcher) for r, k in group])
            shape = (key, bucket(len(group), 1), max(k for _, k in group))
            if proposer.timed and self.plain_step and shape in self._seen:  # cost per drafted token, in
                cost = (time.perf_counter() - started) / shape[2] / self.plain_step  # plain target steps
                for req, _ in group:
                    req.k.draft_cost = _ema(req.k.draft_cost, cost)
            self._seen.add(shape)
            out.update((req.rid, d) for (req, _), d in zip(group, proposed) if d)
        return out

    def timed_step(self, b: int, t: int, seconds: float) -> None:
        """A decode step of shape (B, T) took `seconds` (its first run, which compiles, is not a measurement)."""
        if (b, t) in self._seen:
            self._step_time[(b, t)] = _ema(self._step_time.get((b, t)), seconds)
            self.plain_step = _ema(self.plain_step, seconds / self.relative_cost(t - 1, b))
        self._seen.add((b, t))

    def relative_cost(self, k: int, b: int) -> float:
        """A step verifying k drafts per row, in plain (T = 1) steps of a batch of b: measured once both
        shapes have run, verify_cost's prior until then."""
        t = bucket(k + 1, 1)
        if k and (b, 1) in self._step_time and (b, t) in self._step_time:
            return self._step_time[(b, t)] / self._step_time[(b, 1)]
        return verify_cost(k)

    def accept(self, req: Any, drafted: list[int], sampled: np.ndarray, b: int) -> int:
        """The acceptance rule (module docstring): keep drafts up to the first that differs from its position's
        sample. Returns how many drafts were accepted (the row then emits that many + 1 samples) and updates
        the request's counts, its adaptive k and its proposer's state."""
        accepted = 0
        while accepted < len(drafted) and sampled[accepted] == drafted[accepted]:
            accepted += 1
        if drafted:
            req.times.drafted += len(drafted)
            req.times.accepted += accepted
            req.k.update(len(drafted), accepted, lambda k: self.relative_cost(k, b))
            self._proposer(req.spec).rollback(req.rid, len(req.prompt) + len(req.output) + accepted)
        return accepted

    def release(self, req: Any) -> None:
        """The request finished or was preempted: its proposer forgets it."""
        if req.spec is not None and req.spec.proposer_key in self.proposers:
            self.proposers[req.spec.proposer_key].release(req.rid)

    def _proposer(self, spec: SpeculativeConfig) -> Proposer:
        key = spec.proposer_key
        if key not in self.proposers:
            if spec.method == "ngram":
                self.proposers[key] = NgramProposer(spec)
            elif self.draft_loader is None:
                raise CorejaxError("speculative method 'draft' needs a draft model, and this scheduler has no "
                                   "loader for one")
            else:
                self.proposers[key] = self.draft_loader(spec)
        return self.proposers[key]


class DraftModelProposer:
    """Greedy drafts from a second model that shares the target's tokenizer, over its own paged KV cache.

    Per request it keeps a sequence whose KV trails the target's context; each round it prefills what it has
    not seen (the tokens accepted since, in one batched call for all rows), then decodes k - 1 more tokens
    batched across rows, and after verification rolls back to the accepted prefix."""

    timed = True

    def __init__(self, runner: Any):
        self.runner = runner  # the draft model's ModelRunner (corejax/serving/runner.py)
        self._seqs: set[int] = set()

    def propose(self, rows: list[tuple[int, list[int], int, Any]]) -> list[list[int]]:
        runner = self.runner
        alloc, chunk = runner.allocator, runner.engine_cfg.prefill_chunk
        live: list[tuple[int, list[int], int, int]] = []  # (rid, tokens, k, tokens already in the draft's KV)
        matchers = []
        for rid, tokens, k, matcher in rows:
            try:
                if rid in self._seqs:
                    have = alloc.num_tokens(rid)
                    alloc.append(rid, tokens[have:])
                else:
                    have = alloc.allocate(rid, tokens, reuse=runner.engine_cfg.prefix_cache)
                    self._seqs.add(rid)
            except CacheFullError:
                self.release(rid)
                continue
            live.append((rid, tokens, k, have))
            matchers.append(matcher)
        if not live:
            return [[] for _ in rows]
        k_max = max(k for _, _, k, _ in live)
        width = runner.table_pages or table_width([len(t) + k_max for _, t, _, _ in live],
                                                  runner.engine_cfg.page_size)
        rids = [rid for rid, *_ in live]
        # Catch up: long pending spans (a new request's prompt) in chunks of their own, the rest batched.
        parts, starts = [], []
        for rid, tokens, _, have in live:
            while len(tokens) - have > chunk:
                runner.prefill(StepBatch.build([tokens[have:have + chunk]], [have], [rid], alloc, width,
                                               MIN_PREFILL_BUCKET))
                have += chunk
            parts.append(tokens[have:])
            starts.append(have)
        b = bucket(len(live), 1)
        greedy = SamplingBatch.build([SamplingParams(temperature=0.0)] * len(live), [], [], b,
                                     runner.cfg.vocab_size)
        guide = _DraftGuide(matchers, [k for _, _, k, _ in live], b, runner.cfg.vocab_size)
        first = np.asarray(runner.prefill(StepBatch.build(parts, starts, rids, alloc, width, MIN_PREFILL_BUCKET),
                                          greedy, guide.masks()).tokens)
        drafts = [[int(t)] for t in first[:len(live)]]
        guide.advance(drafts)
        for j in range(1, k_max):
            for i, rid in enumerate(rids):
                alloc.append(rid, [drafts[i][-1]])
            batch = StepBatch.build([[d[-1]] for d in drafts], [len(t) + j - 1 for _, t, _, _ in live], rids,
                                    alloc, width)
            masks = guide.masks()
            out = runner.decode(batch, greedy, np.zeros((b,), np.int32), None if masks is None else masks[:, None])
            for i, t in enumerate(np.asarray(out.tokens)[:len(live), 0]):
                drafts[i].append(int(t))
            guide.advance(drafts)
        by_rid = {rid: d[:min(k, cap)] for (rid, _, k, _), d, cap in zip(live, drafts, guide.caps)}
        return [by_rid.get(rid, []) for rid, *_ in rows]

    def rollback(self, rid: int, length: int) -> None:
        if rid in self._seqs:
            alloc = self.runner.allocator
            alloc.truncate(rid, min(length, alloc.num_tokens(rid)))

    def release(self, rid: int) -> None:
        if rid in self._seqs:
            self._seqs.discard(rid)
            self.runner.allocator.free(rid)


class _DraftGuide:
    """Structured output for a draft model: each constrained row drafts under a fork of its request's grammar
    (corejax/serving/structured.py), so its drafts are grammatical and worth verifying; the request's own matcher does
    not move. caps[i]: how many of row i's drafts to keep (a draft after the grammar ends or fails is cut)."""

    def __init__(self, matchers: list[Any], ks: list[int], b: int, vocab_size: int):
        self.forks = [None if m is None or m.vocab.vocab_size != vocab_size else m.fork() for m in matchers]
        self.caps = list(ks)
        self.b, self.vocab_size = b, vocab_size

    def masks(self) -> np.ndarray | None:
        rows = [(f, i, []) for i, f in enumerate(self.forks) if f is not None]
        if not rows:
            return None
        from corejax.serving.structured import mask_words

        masks = np.full((self.b, mask_words(self.vocab_size)), -1, np.int32)
        for _, i, _ in rows:
            masks[i] = 0
        rows[0][0].vocab.fill(rows, masks)
        return masks

    def advance(self, drafts: list[list[int]]) -> None:
        """Each constrained row's newest draft token enters its fork; a row whose grammar rejects it, or is
        complete after it, drafts no further."""
        for i, fork in enumerate(self.forks):
            if fork is None:
                continue
            n = len(drafts[i])
            if fork.failed or not fork.llm.consume_token(drafts[i][-1]):
                self.caps[i] = min(self.caps[i], n - 1)
                self.forks[i] = None
            elif fork.done:
                self.caps[i] = min(self.caps[i], n)
                self.forks[i] = None
