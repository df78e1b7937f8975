"""Continuous batching: requests join and leave the running batch between steps, and one jitted decode call
serves every running sequence.

One `step()`:
1. drops cancelled requests (their pages go back to the pool before anything else is scheduled);
2. admits waiting requests in arrival order while the batch has room and the page pool holds their prompt —
   a request that does not fit blocks the ones behind it (FIFO, so nobody starves);
3. runs one prefill chunk of the oldest admitted-but-unprefilled request — at most `interleave_chunk` tokens
   while other sequences are decoding, so a long prompt delays each running stream by one short chunk
   instead of stalling it — batched with the final chunks of the requests behind it that fit the same budget;
4. runs one decode step for every running sequence: [B, T] tokens in one call (B bucketed to a power of two,
   T = 1 + the longest speculative draft, see corejax/speculative.py), then keeps each row's accepted tokens.

When a sequence cannot get a page, the most recently admitted other sequence is preempted by recompute
(vLLM's default): its pages are freed and it goes back to the front of the queue; on readmission its prompt
and output so far are prefilled again (prefix-cache hits make that cheap) and it continues where it was,
with the same random stream (keys are folded per output position), so preemption never changes the text.

The scheduler runs on its own thread (`corejax-scheduler`); callers iterate a `Request` for its TokenEvents
and close it to cancel. Tests drive `step()` directly with `background=False`.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from corejax.engine import (
    MIN_PREFILL_BUCKET,
    Engine,
    bucket,
    penalty_state,
)
from corejax.errors import CacheFullError, CorejaxError
from corejax.requests import DONE, Request, StepTimes, TokenEvent  # noqa: F401 - StepTimes re-exported
from corejax.sampling import SamplingParams, SamplingTensors
from corejax.speculative import Proposer, SpeculativeConfig, ngram_propose, verify_cost
from corejax.structured import FINISH_UNSATISFIABLE, mask_words

GREEDY_ROW = SamplingParams(temperature=0.0)


def _host(out: Any, with_logprobs: bool) -> Any:
    """A SampleOutput's arrays as numpy, fetched once per step (each fetch of a device array costs ~1 ms);
    the logprob arrays only when some row asked for them."""
    fetch = np.asarray if with_logprobs else (lambda x: x)  # noqa: E731
    return dataclasses.replace(out, tokens=np.asarray(out.tokens), logprob=fetch(out.logprob),
                               top_ids=fetch(out.top_ids), top_logprobs=fetch(out.top_logprobs))


def _ema(old: float | None, new: float, weight: float = 0.3) -> float:
    return new if old is None else (1 - weight) * old + weight * new


class Scheduler:
    """Continuous batching over one Engine (its params, KV page pool and page allocator)."""

    def __init__(self, engine: Engine, *, max_batch: int = 16, interleave_chunk: int = 128,
                 draft_loader: Callable[[SpeculativeConfig], Proposer] | None = None, background: bool = True):
        if max_batch < 1 or max_batch & (max_batch - 1):
            raise ValueError(f"max_batch must be a power of two >= 1; got {max_batch}")
        self.engine = engine
        self.max_batch, self.interleave_chunk = max_batch, interleave_chunk
        self.draft_loader = draft_loader
        self.background = background
        self.waiting: collections.deque[Request] = collections.deque()
        self.prefilling: list[Request] = []
        self.running: list[Request] = []
        self.preemptions = 0
        self.steps = 0
        self._inbox: list[Request] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._next_rid = 0
        self._seq_counter = 0
        self._batch: tuple | None = None  # (row ids, B): the sampling state below belongs to that batch
        self._sampling = self._keys = self._penalties = None
        self._proposers: dict[tuple, Proposer] = {}
        self._plain_step: float | None = None  # seconds of a T = 1 decode step (estimated from verifies too)
        self._step_time: dict[tuple[int, int], float] = {}  # (B, T) bucket -> seconds per decode step
        self._seen_shapes: set[tuple] = set()  # step shapes run once already (their compile is behind them)

    # --- the caller's side -----------------------------------------------------------------------------

    def submit(self, prompt: list[int], sp: SamplingParams, stop_ids: frozenset[int],
               spec: SpeculativeConfig | None = None, matcher: Any = None) -> Request:
        """Queues a request (raises ContextLengthError at once if the prompt cannot fit the context).
        matcher: structured output's grammar state for this request (corejax/structured.py), or None."""
        cfg = self.engine.cfg
        self.engine.check_fits(len(prompt))
        with self._cv:
            rid = self._next_rid
            self._next_rid += 1
            req = Request(self, rid, prompt, sp, stop_ids, min(sp.max_tokens, cfg.max_context - len(prompt)), spec,
                          matcher)
            self._inbox.append(req)
            if self.background and self._thread is None:
                self._thread = threading.Thread(target=Scheduler._loop, args=(weakref.ref(self),),
                                                name="corejax-scheduler", daemon=True)
                self._thread.start()
            self._cv.notify()
        return req

    def cancel(self, req: Request) -> None:
        with self._cv:
            req.cancelled = True
            self._cv.notify()

    # --- the loop ----------------------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return not (self._inbox or self.waiting or self.prefilling or self.running)

    @staticmethod
    def _loop(ref: weakref.ref) -> None:
        """The background thread. It holds its scheduler only while stepping, never while it waits, so a
        Runtime nobody references any more is freed — weights, KV pool and all — and the thread ends."""
        while True:
            sched = ref()
            if sched is None:
                return
            cv = sched._cv
            with cv:  # submit() appends and notifies under this lock: no wake-up is lost between check and wait
                idle = sched.idle
                if idle:
                    del sched
                    cv.wait(timeout=0.5)
            if not idle:
                try:
                    sched.step()
                except Exception as e:  # noqa: BLE001 - a failed step fails the requests in it, not the scheduler
                    for req in [*sched.prefilling, *sched.running]:
                        sched._finish(req, e)
                del sched

    def load(self) -> tuple[int, int]:
        """(requests waiting, requests prefilling or decoding): a snapshot for info() and metrics."""
        with self._cv:
            inbox = len(self._inbox)
        return inbox + len(self.waiting), len(self.prefilling) + len(self.running)

    def run_until_idle(self) -> None:
        """Steps until every request has finished (background=False: tests and single-threaded use)."""
        while not self.idle:
            self.step()

    def step(self) -> None:
        with self._cv:
            self.waiting.extend(self._inbox)
            self._inbox.clear()
        for req in [r for r in (*self.waiting, *self.prefilling, *self.running) if r.cancelled]:
            self._finish(req)
        self._admit()
        if self.prefilling:
            self._prefill()
        if self.running:
            self._decode()
        self.steps += 1

    def _admit(self) -> None:
        alloc, ec = self.engine.allocator, self.engine.engine_cfg
        while self.waiting and len(self.prefilling) + len(self.running) < self.max_batch:
            req = self.waiting[0]
            seq = self._new_seq()
            try:
                reused = alloc.allocate(seq, req.context, reuse=ec.prefix_cache)
            except CacheFullError as e:
                if self.prefilling or self.running:
                    return  # pages come back as running sequences finish; nobody behind it overtakes it
                self.waiting.popleft()
                self._finish(req, e)  # it cannot fit even in an empty pool
                continue
            self.waiting.popleft()
            req.seq, req.computed = seq, reused
            if not req.output:
                req.times.cached_tokens = reused
            self.prefilling.append(req)

    def _new_seq(self) -> int:
        self._seq_counter += 1
        return self._seq_counter

    def _width(self, reqs: list[Request]) -> int:
        """Page-table columns: enough for each row's final length, bucketed so a request compiles once."""
        ps = self.engine.engine_cfg.page_size
        # Drafts never run past max_new (see _propose), so prompt + max_new bounds every position written.
        return bucket(max(-(-(len(r.prompt) + r.max_new) // ps) for r in reqs), 16)

    def _prefill(self) -> None:
        """One prefill call: the next chunk of the oldest admitted request, plus — when that chunk is its
        last — the last chunks of the requests queued behind it that fit the same token budget, as rows of
        one batch (a burst of short prompts is prefilled in one call, not one step each)."""
        eng = self.engine
        budget = eng.engine_cfg.prefill_chunk
        if self.running:
            budget = min(budget, self.interleave_chunk)
        group: list[tuple[Request, list[int], bool]] = []  # (request, its part, whether this finishes it)
        used = 0
        for req in self.prefilling:
            context = req.context
            part = context[req.computed:req.computed + budget]
            final = req.computed + len(part) >= len(context)
            if group and (not final or used + len(part) > budget or len(group) == self.max_batch):
                break
            group.append((req, part, final))
            used += len(part)
            if not final:
                break  # a long prompt's middle chunk runs alone
        b = len(group) if len(group) == 1 else bucket(len(group), 1)
        t = bucket(max(len(part) for _, part, _ in group), MIN_PREFILL_BUCKET)
        tokens = np.zeros((b, t), np.int32)
        positions = np.zeros((b, t), np.int32)
        lengths = np.zeros((b,), np.int32)
        last = np.zeros((b,), np.int32)
        for i, (req, part, _) in enumerate(group):
            tokens[i, :len(part)] = part
            positions[i] = np.arange(req.computed, req.computed + t)
            lengths[i] = req.computed + len(part)
            last[i] = len(part) - 1
        reqs = [req for req, _, _ in group]
        width = self._width(reqs)
        table = np.zeros((b, width), np.int32)
        table[:len(reqs)] = eng.allocator.page_table([r.seq for r in reqs], width)
        samplers = [r for r, _, final in group if final and not r.output]  # resumed requests hold their token
        extra = {}
        if samplers:
            v = eng.cfg.vocab_size
            sampling = SamplingTensors.from_params([r.sp if r in samplers else GREEDY_ROW for r in reqs], v,
                                                   batch_size=b)
            keys = np.zeros((b, 2), np.uint32)
            keys[:len(reqs)] = [r.key for r in reqs]
            extra = dict(sampling=sampling, keys=keys, mask=self._masks(samplers, [[] for _ in samplers],
                                                                         [reqs.index(r) for r in samplers], b, 1),
                         penalties=(penalty_state([(r.prompt, []) for r in reqs], b, v) if sampling.any_penalty
                                    else None))
            if extra["mask"] is not None:
                extra["mask"] = extra["mask"][:, 0]
        out, eng.cache = eng.programs.prefill(eng.params, tokens, positions, last,
                                              eng.cache.with_rows(table, lengths), cfg=eng.cfg, **extra)
        if samplers:
            out = _host(out, with_logprobs=any(r.sp.logprobs is not None for r in samplers))
        for i, (req, part, final) in enumerate(group):
            req.computed += len(part)
            if final:
                self.prefilling.remove(req)
                self.running.append(req)
                if req in samplers and not self._unsatisfiable(req):
                    self._emit(req, out, i, 1)

    # --- decode ----------------------------------------------------------------------------------------

    def _decode(self) -> None:
        eng = self.engine
        alloc = eng.allocator
        drafts = self._propose(list(self.running))
        for req in self.running:  # a draft the grammar rejects could never be accepted: do not verify it
            d = drafts.get(req.rid)
            if d and req.matcher is not None:
                drafts[req.rid] = d[:req.matcher.valid_prefix(d)]
        fed: dict[int, list[int]] = {}
        for req in list(self.running):
            if req not in self.running:
                continue  # preempted to make room for an earlier row
            while True:
                tokens = [req.output[-1], *drafts.get(req.rid, [])]
                try:
                    for c in alloc.append(req.seq, tokens):
                        eng.cache = eng.programs.copy_page(eng.cache, np.int32(c.src), np.int32(c.dst))
                    fed[req.rid] = tokens
                    break
                except CacheFullError as e:
                    if drafts.get(req.rid):
                        drafts[req.rid] = []  # speculation is the first thing to give up
                        continue
                    victim = next((r for r in reversed(self.running) if r is not req), None)
                    if victim is None:
                        self._finish(req, e)
                        break
                    self._preempt(victim)
        rows = [r for r in self.running if r.rid in fed]
        if not rows:
            return
        width = self._width(rows)
        b = bucket(len(rows), 1)
        t = bucket(max(len(fed[r.rid]) for r in rows), 1)
        tokens = np.zeros((b, t), np.int32)
        positions = np.zeros((b, t), np.int32)
        lengths = np.zeros((b,), np.int32)
        for i, req in enumerate(rows):
            f = fed[req.rid]
            start = alloc.num_tokens(req.seq) - len(f)
            tokens[i, :len(f)] = f
            positions[i] = np.arange(start, start + t)
            lengths[i] = start + len(f)
        table = np.zeros((b, width), np.int32)
        table[:len(rows)] = alloc.page_table([r.seq for r in rows], width)
        self._batch_state(rows, b)
        steps = np.zeros((b,), np.int32)
        steps[:len(rows)] = [len(r.output) for r in rows]
        mask = self._masks(rows, [fed[r.rid][1:] for r in rows], range(len(rows)), b, t)
        started = time.perf_counter()
        out, eng.cache, self._penalties = eng.programs.decode_step(
            eng.params, tokens, positions, eng.cache.with_rows(table, lengths), self._sampling, self._penalties,
            self._keys, steps, cfg=eng.cfg, mask=mask)
        out = _host(out, with_logprobs=any(r.sp.logprobs is not None for r in rows))
        sampled = out.tokens
        elapsed = time.perf_counter() - started
        if (b, t) in self._seen_shapes:  # a shape's first step includes its compilation: not a measurement
            self._step_time[(b, t)] = _ema(self._step_time.get((b, t)), elapsed)
            self._plain_step = _ema(self._plain_step, elapsed / self._relative_cost(t - 1, b))
        self._seen_shapes.add((b, t))
        for i, req in enumerate(rows):
            if self._unsatisfiable(req):
                continue
            d = fed[req.rid][1:]
            accepted = 0
            while accepted < len(d) and sampled[i, accepted] == d[accepted]:
                accepted += 1
            if d:
                alloc.truncate(req.seq, int(lengths[i]) - len(d) + accepted)
                req.times.drafted += len(d)
                req.times.accepted += accepted
                req.k.update(len(d), accepted, lambda k, b=b: self._relative_cost(k, b))
                self._proposer_rollback(req, accepted)
            self._emit(req, out, i, accepted + 1)

    def _masks(self, reqs: list[Request], drafts: list[list[int]], rows: Any, b: int, t: int) -> np.ndarray | None:
        """Structured output's token bitmasks [b, t, W] for a step (None when no row is constrained): row i's
        mask at position 0 and after each of its drafted tokens; unconstrained rows allow everything. A row
        whose grammar allows no token at all is marked to end as unsatisfiable after the step."""
        constrained = [(req, d, i) for req, d, i in zip(reqs, drafts, rows) if req.matcher is not None]
        if not constrained:
            return None
        started = time.perf_counter()
        masks = np.full((b * t, mask_words(self.engine.cfg.vocab_size)), -1, np.int32)
        for _, _, i in constrained:
            masks[i * t:(i + 1) * t] = 0
        constrained[0][0].matcher.vocab.fill([(req.matcher, i * t, d) for req, d, i in constrained], masks)
        share = (time.perf_counter() - started) / len(constrained)
        for req, _, i in constrained:
            req.times.mask_s += share
            if req.matcher.failed or not masks[i * t].any():
                req.finish_reason = FINISH_UNSATISFIABLE
        return masks.reshape(b, t, -1)

    def _unsatisfiable(self, req: Request) -> bool:
        if req.finish_reason != FINISH_UNSATISFIABLE:
            return False
        self._finish(req)
        return True

    def _relative_cost(self, k: int, b: int) -> float:
        """A step verifying k drafts per row, in plain (T = 1) steps of a batch of b: measured once both
        shapes have run, verify_cost's prior until then."""
        t = bucket(k + 1, 1)
        if k and (b, 1) in self._step_time and (b, t) in self._step_time:
            return self._step_time[(b, t)] / self._step_time[(b, 1)]
        return verify_cost(k)

    def _batch_state(self, rows: list[Request], b: int) -> None:
        """Sampling tensors, keys and penalty state of this batch; rebuilt only when its rows change."""
        key = (tuple(r.rid for r in rows), b)
        if key == self._batch:
            return
        v = self.engine.cfg.vocab_size
        self._sampling = SamplingTensors.from_params([r.sp for r in rows], v, batch_size=b)
        keys = np.zeros((b, 2), np.uint32)
        keys[:len(rows)] = [r.key for r in rows]
        self._keys = keys
        self._penalties = (penalty_state([(r.prompt + r.output[:-1], r.output[:-1]) for r in rows], b, v)
                           if self._sampling.any_penalty else None)
        self._batch = key

    def _emit(self, req: Request, out: Any, row: int, count: int) -> None:
        """Hands the row's first `count` sampled tokens to the caller; finishes at a stop id or max_new.

        `out` is a prefill's SampleOutput ([B] tokens) or a decode step's ([B, T]), already on the host."""
        per_row = lambda x, extra: np.asarray(x).reshape(np.shape(out.tokens)[0], -1, *extra)[row]  # noqa: E731
        tokens = per_row(out.tokens, ())
        lp = req.sp.logprobs
        if lp is not None:
            n = out.top_ids.shape[-1]
            logprob, top_ids, top_lp = per_row(out.logprob, ()), per_row(out.top_ids, (n,)), per_row(
                out.top_logprobs, (n,))
        now = time.perf_counter()
        for j in range(count):
            token = int(tokens[j])
            event = TokenEvent(token)
            if lp is not None:
                event = TokenEvent(token, float(logprob[j]),
                                   list(zip(top_ids[j, :lp].tolist(), top_lp[j, :lp].tolist())))
            req.output.append(token)
            if req.matcher is not None:
                req.matcher.consume(token)
            if req.times.generated == 0:
                req.times.first_token = now
            req.times.last_token = now
            req.times.generated += 1
            req.put(event)
            if req.matcher is not None and req.matcher.done:  # the grammar is complete: nothing may follow
                req.finish_reason = "stop"
                self._finish(req)
                return
            if (token in req.stop_ids and not req.sp.ignore_eos) or len(req.output) >= req.max_new:
                self._finish(req)
                return

    def _finish(self, req: Request, error: BaseException | None = None) -> None:
        for queue in (self.prefilling, self.running):
            if req in queue:
                queue.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        if req.seq is not None:
            self.engine.allocator.free(req.seq)
            req.seq = None
        self._proposer_release(req)
        if not req.finished:
            req.finished = True
            req.put(error if error is not None else DONE)

    def _preempt(self, req: Request) -> None:
        """Recompute-preemption: free the pages, requeue at the front; the output so far is kept."""
        self.running.remove(req)
        self.engine.allocator.free(req.seq)
        req.seq, req.computed = None, 0
        req.times.preempted += 1
        self.preemptions += 1
        self._proposer_release(req)
        self.waiting.appendleft(req)

    # --- speculative decoding ----------------------------------------------------------------------------

    def _propose(self, rows: list[Request]) -> dict[int, list[int]]:
        """Drafted tokens per request id (none for rows that do not speculate or found nothing to propose)."""
        drafts: dict[int, list[int]] = {}
        by_model: dict[tuple, list[tuple[Request, int]]] = collections.defaultdict(list)
        for req in rows:
            if not req.speculates:
                continue
            k = min(req.k.tick(), req.max_new - len(req.output) - 1)
            if k <= 0:
                continue
            if req.spec.method == "ngram":
                d = ngram_propose(req.prompt + req.output, k, req.spec.ngram_max, req.spec.ngram_min)
                if d:
                    drafts[req.rid] = d
            else:
                by_model[req.spec.draft_key].append((req, k))
        for key, group in by_model.items():
            proposer = self._proposer(group[0][0].spec)
            started = time.perf_counter()
            proposed = proposer.propose([(r.rid, r.prompt + r.output, k) for r, k in group])
            shape = (key, bucket(len(group), 1), max(k for _, k in group))
            if self._plain_step and shape in self._seen_shapes:  # the draft's cost per drafted token, in
                cost = (time.perf_counter() - started) / shape[2] / self._plain_step  # plain target steps
                for req, _ in group:
                    req.k.draft_cost = _ema(req.k.draft_cost, cost)
            self._seen_shapes.add(shape)
            for (req, _), d in zip(group, proposed):
                if d:
                    drafts[req.rid] = d
        return drafts

    def _proposer(self, spec: SpeculativeConfig) -> Proposer:
        if spec.draft_key not in self._proposers:
            if self.draft_loader is None:
                raise CorejaxError("speculative method 'draft' needs a draft model, and this scheduler has no "
                                   "loader for one")
            self._proposers[spec.draft_key] = self.draft_loader(spec)
        return self._proposers[spec.draft_key]

    def _proposer_rollback(self, req: Request, accepted: int) -> None:
        if req.spec is not None and req.spec.method == "draft" and req.spec.draft_key in self._proposers:
            self._proposers[req.spec.draft_key].rollback(req.rid, len(req.prompt) + len(req.output) + accepted)

    def _proposer_release(self, req: Request) -> None:
        if req.spec is not None and req.spec.method == "draft" and req.spec.draft_key in self._proposers:
            self._proposers[req.spec.draft_key].release(req.rid)
