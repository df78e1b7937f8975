"""Continuous batching: requests join and leave the running batch between steps; one jitted decode call
serves every running sequence. One `step()`:
1. drops cancelled requests (their pages go back to the pool before anything else is scheduled);
2. admits waiting requests in arrival order while the batch has room and the page pool holds their prompt —
   a request that does not fit blocks the ones behind it (FIFO, so nobody starves);
3. runs one prefill chunk of the oldest admitted-but-unprefilled request, batched with the final chunks of the
   requests behind it that fit the same token budget: the engine's whole prefill_chunk when nothing decodes;
   while other sequences decode, the largest power-of-two budget whose measured time stays within the engine's
   max_prefill_stall (1 s), at least `interleave_floor` tokens (corejax/serving/pacing.py says why a few
   whole chunks beat many small ones on CPU);
4. runs one decode step for every running sequence: [B, T] tokens in one call (B bucketed to a power of two,
   T = 1 + the longest speculative draft, see corejax/serving/speculative.py), then keeps each row's accepted tokens.
When a sequence cannot get a page, the most recently admitted other sequence is preempted by recompute
(vLLM's default): its pages are freed and it goes back to the front of the queue; on readmission its prompt
and output so far are prefilled again (prefix-cache hits make that cheap) and it continues where it was,
with the same random stream (keys are folded per output position), so preemption never changes the text.
It runs on its own thread (`corejax-scheduler`); callers iterate a `Request` for its TokenEvents and close it
to cancel; tests drive `step()` with `background=False`."""

from __future__ import annotations

import collections
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from corejax.serving.loops import EXITING, LOOPS
from corejax.serving.batch import MIN_PREFILL_BUCKET, StepBatch, prefill_parts, table_width
from corejax.serving.pacing import INTERLEAVE_FLOOR, PrefillPacer
from corejax.serving.runner import ModelRunner
from corejax.errors import CacheFullError
from corejax.serving.requests import DONE, Request
from corejax.engine.sampling import SamplingBatch
from corejax.types.options import SamplingParams
from corejax.serving.speculative import Proposer, Speculation, SpeculativeConfig
from corejax.serving.structured import FINISH_UNSATISFIABLE, step_masks, trim_drafts

GREEDY_ROW = SamplingParams(temperature=0.0)

class Scheduler:
    """Continuous batching over one ModelRunner (its params, KV page pool and page allocator)."""

    def __init__(self, runner: ModelRunner, *, max_batch: int = 16, interleave_floor: int = INTERLEAVE_FLOOR,
                 draft_loader: Callable[[SpeculativeConfig], Proposer] | None = None, background: bool = True):
        """interleave_floor: the fewest prompt tokens a step prefills while others decode (pacing.py); the most
        it may stall them is the engine's max_prefill_stall."""
        if max_batch < 1 or max_batch & (max_batch - 1):
            raise ValueError(f"max_batch must be a power of two >= 1; got {max_batch}")
        self.runner = runner
        self.max_batch = max_batch
        ec = runner.engine_cfg
        self.pacer = PrefillPacer(ec.prefill_chunk, ec.max_prefill_stall, interleave_floor)
        self.speculation = Speculation(draft_loader)
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
        self._batch: tuple | None = None  # (row ids, B) that self._sampling was built for
        self._sampling: SamplingBatch | None = None

    # --- the caller's side -----------------------------------------------------------------------------

    def submit(self, prompt: list[int], sp: SamplingParams, stop_ids: frozenset[int],
               spec: SpeculativeConfig | None = None, matcher: Any = None) -> Request:
        """Queues a request (raises ContextLengthError at once if the prompt cannot fit the context).
        matcher: structured output's grammar state for this request (corejax/serving/structured.py), or None."""
        cfg = self.runner.cfg
        self.runner.check_fits(len(prompt))
        with self._cv:
            rid = self._next_rid
            self._next_rid += 1
            req = Request(self, rid, prompt, sp, stop_ids, min(sp.max_tokens, cfg.max_context - len(prompt)), spec,
                          matcher)
            self._inbox.append(req)
            if self.background and self._thread is None:
                self._thread = threading.Thread(target=Scheduler._loop, args=(weakref.ref(self),),
                                                name="corejax-scheduler", daemon=True)
                LOOPS[self._thread] = self._cv
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
        try:
            Scheduler._serve(ref)
        finally:
            LOOPS.pop(threading.current_thread(), None)

    @staticmethod
    def _serve(ref: weakref.ref) -> None:
        while not EXITING.is_set():
            sched = ref()
            if sched is None:
                return
            cv = sched._cv
            with cv:  # submit() appends and notifies under this lock: no wake-up is lost between check and wait
                idle = sched.idle or EXITING.is_set()
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
        alloc, ec = self.runner.allocator, self.runner.engine_cfg
        while self.waiting and len(self.prefilling) + len(self.running) < self.max_batch:
            req = self.waiting[0]
            self._seq_counter += 1
            try:
                # written=0: the prompt's pages are offered to other prompts chunk by chunk, as _prefill writes them
                reused = alloc.allocate(self._seq_counter, req.context, reuse=ec.prefix_cache, written=0)
            except CacheFullError as e:
                if self.prefilling or self.running:
                    return  # pages come back as running sequences finish; nobody behind it overtakes it
                self.waiting.popleft()
                self._finish(req, e)  # it cannot fit even in an empty pool
                continue
            self.waiting.popleft()
            req.seq, req.computed = self._seq_counter, reused
            if not req.output:
                req.times.cached_tokens = reused
            self.prefilling.append(req)

    def _batch_of(self, reqs: list[Request], parts: list[list[int]], starts: list[int], min_t: int = 1) -> StepBatch:
        # Drafts never run past max_new (Speculation.drafts), so prompt + max_new bounds every position written.
        width = self.runner.table_pages or table_width([len(r.prompt) + r.max_new for r in reqs],
                                                        self.runner.engine_cfg.page_size)
        return StepBatch.build(parts, starts, [r.seq for r in reqs], self.runner.allocator, width, min_t)

    def _prefill(self) -> None:
        """One prefill call (batch.prefill_parts chooses its rows): prompt chunks written to the cache, and the
        first token sampled for the rows whose prompt it finishes."""
        runner = self.runner
        budget = self.pacer.budget(decoding=bool(self.running))
        parts = prefill_parts(((r.context, r.computed) for r in self.prefilling), budget, self.max_batch)
        reqs = self.prefilling[:len(parts)]
        batch = self._batch_of(reqs, [part for part, _ in parts], [r.computed for r in reqs], MIN_PREFILL_BUCKET)
        samplers = [r for r, (_, final) in zip(reqs, parts) if final and not r.output]  # resumed ones hold theirs
        sampling, mask = None, None
        if samplers:
            b = batch.shape[0]
            sampling = SamplingBatch.build([r.sp if r in samplers else GREEDY_ROW for r in reqs],
                                           [r.key for r in reqs], [(r.prompt, []) for r in reqs], b,
                                           runner.cfg.vocab_size)
            mask = step_masks(samplers, [[] for _ in samplers], [reqs.index(r) for r in samplers], b, 1,
                              runner.cfg.vocab_size)
        started = time.perf_counter()
        out = runner.prefill(batch, sampling, None if mask is None else mask[:, 0])
        if samplers:
            out = out.to_host(with_logprobs=any(r.sp.logprobs is not None for r in samplers))
            self.pacer.timed(batch.shape, time.perf_counter() - started)
        for i, (req, (part, final)) in enumerate(zip(reqs, parts)):
            req.computed += len(part)
            runner.allocator.mark_written(req.seq, req.computed)
            if final:
                self.prefilling.remove(req)
                self.running.append(req)
                if req in samplers and not self._unsatisfiable(req):
                    self._emit(req, out, i, 1)

    # --- decode ----------------------------------------------------------------------------------------

    def _decode(self) -> None:
        runner = self.runner
        alloc = runner.allocator
        drafts = self.speculation.drafts(list(self.running))
        trim_drafts(self.running, drafts)  # structured output: drafts the grammar rejects are not verified
        fed: dict[int, list[int]] = {}
        for req in list(self.running):
            if req not in self.running:
                continue  # preempted to make room for an earlier row
            while True:
                tokens = [req.output[-1], *drafts.get(req.rid, [])]
                try:
                    runner.copy_pages(alloc.append(req.seq, tokens))
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
        batch = self._batch_of(rows, [fed[r.rid] for r in rows],
                               [alloc.num_tokens(r.seq) - len(fed[r.rid]) for r in rows])
        b, t = batch.shape
        sampling = self._sampling_of(rows, b)
        steps = np.zeros((b,), np.int32)
        steps[:len(rows)] = [len(r.output) for r in rows]
        mask = step_masks(rows, [fed[r.rid][1:] for r in rows], range(len(rows)), b, t, runner.cfg.vocab_size)
        started = time.perf_counter()
        out = runner.decode(batch, sampling, steps, mask)
        out = out.to_host(with_logprobs=any(r.sp.logprobs is not None for r in rows))
        self.speculation.timed_step(b, t, time.perf_counter() - started)
        for i, req in enumerate(rows):
            if self._unsatisfiable(req):
                continue
            d = fed[req.rid][1:]
            accepted = self.speculation.accept(req, d, out.tokens[i], b)
            if d:  # the KV written for rejected drafts is dropped
                alloc.truncate(req.seq, int(batch.lengths[i]) - len(d) + accepted)
            self._emit(req, out, i, accepted + 1)

    def _sampling_of(self, rows: list[Request], b: int) -> SamplingBatch:
        """The batch's sampling state, rebuilt only when its rows change (the penalty state then lives on the
        device, updated by each step)."""
        key = (tuple(r.rid for r in rows), b)
        if key != self._batch:
            self._sampling = SamplingBatch.build([r.sp for r in rows], [r.key for r in rows],
                                                 [(r.prompt + r.output[:-1], r.output[:-1]) for r in rows], b,
                                                 self.runner.cfg.vocab_size)
            self._batch = key
        return self._sampling

    def _unsatisfiable(self, req: Request) -> bool:
        if req.finish_reason == FINISH_UNSATISFIABLE:
            self._finish(req)
        return req.finished

    def _emit(self, req: Request, out: Any, row: int, count: int) -> None:
        """Hands the row's first `count` sampled tokens (of a host SampleOutput) to the caller."""
        tokens, lp = out.row(row), req.sp.logprobs
        if lp is not None:
            logprob, top_ids, top_lp = out.row_logprobs(row)
        for j in range(count):
            top = None if lp is None else list(zip(top_ids[j, :lp].tolist(), top_lp[j, :lp].tolist()))
            if req.record(int(tokens[j]), None if lp is None else float(logprob[j]), top):
                self._finish(req)
                return

    def _finish(self, req: Request, error: BaseException | None = None) -> None:
        for queue in (self.prefilling, self.running, self.waiting):
            if req in queue:
                queue.remove(req)
        if req.seq is not None:
            self.runner.allocator.free(req.seq)
            req.seq = None
        self.speculation.release(req)
        if not req.finished:
            req.finished = True
            req.put(error if error is not None else DONE)

    def _preempt(self, req: Request) -> None:
        """Recompute-preemption: free the pages, requeue at the front; the output so far is kept."""
        self.running.remove(req)
        self.runner.allocator.free(req.seq)
        req.seq, req.computed = None, 0
        req.times.preempted += 1
        self.preemptions += 1
        self.speculation.release(req)
        self.waiting.appendleft(req)
