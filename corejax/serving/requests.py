"""A generation request as the scheduler tracks it, and what its caller iterates: TokenEvents until the end.

The caller's side of corejax/serving/scheduler.py: a Request is created by Scheduler.submit, filled by the scheduler
thread (`_put`), iterated by the caller, and closed by the caller to cancel it."""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Iterator
from typing import Any

from corejax.engine.sampling import request_key
from corejax.types.options import SamplingParams
from corejax.serving.speculative import AdaptiveK, SpeculativeConfig


@dataclasses.dataclass
class TokenEvent:
    """One generated token, as a Request yields it."""

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
    drafted: int = 0  # speculative tokens proposed
    accepted: int = 0  # ... and accepted by the target model
    preempted: int = 0  # times this request was preempted (recomputed)
    mask_s: float = 0.0  # host time spent on this request's structured-output token masks


DONE = object()


class Request:
    """One generation request as the scheduler tracks it. Iterate it for TokenEvents; close() cancels it."""

    def __init__(self, scheduler: Any, rid: int, prompt: list[int], sp: SamplingParams,
                 stop_ids: frozenset[int], max_new: int, spec: SpeculativeConfig | None, matcher: Any = None):
        self.scheduler, self.rid, self.prompt, self.sp = scheduler, rid, list(prompt), sp
        self.stop_ids, self.max_new, self.spec = stop_ids, max_new, spec
        self.output: list[int] = []
        self.key = request_key(sp.seed)
        self.seq: int | None = None  # page-allocator sequence while admitted
        self.computed = 0  # tokens of `context` whose KV is in the cache
        self.cancelled = False
        self.finished = False
        self.times = StepTimes(start=time.perf_counter())
        self.k = AdaptiveK(spec) if spec is not None else None
        self.matcher = matcher  # structured output: the grammar state (corejax/serving/structured.py), or None
        self.finish_reason: str | None = None  # set when the scheduler, not a token, decided the end
        self._events: collections.deque = collections.deque()
        self._ready = threading.Condition()

    @property
    def context(self) -> list[int]:
        """Tokens whose KV must be cached before the next decode step: all but the last sampled token."""
        return self.prompt + self.output[:-1]

    @property
    def speculates(self) -> bool:
        # Penalties change with every accepted token; the verify step applies them at position 0 only.
        return self.spec is not None and not _has_penalties(self.sp)

    def record(self, token: int, logprob: float | None = None, top: list | None = None) -> bool:
        """Adds a sampled token to the output and hands it to the caller; True when the request must end
        here (a stop id, max_new, or its grammar complete: structured output)."""
        self.output.append(token)
        if self.matcher is not None:
            self.matcher.consume(token)
        now = time.perf_counter()
        if self.times.generated == 0:
            self.times.first_token = now
        self.times.last_token = now
        self.times.generated += 1
        self.put(TokenEvent(token, logprob, top))
        if self.matcher is not None and self.matcher.done:  # nothing may follow a complete grammar
            self.finish_reason = "stop"
            return True
        return (token in self.stop_ids and not self.sp.ignore_eos) or len(self.output) >= self.max_new

    def put(self, item: Any) -> None:
        with self._ready:
            self._events.append(item)
            self._ready.notify()

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            with self._ready:
                while not self._events:
                    self._ready.wait()
                item = self._events[0]
                if item is not DONE and not isinstance(item, BaseException):
                    self._events.popleft()  # the terminal item stays: iterating again ends at once
            if item is DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Cancels the request if it is still running; its pages are freed before the next step."""
        self.scheduler.cancel(self)


def _has_penalties(sp: SamplingParams) -> bool:
    """Penalties or a logit_bias: both live in the per-row penalty state, which the verify step of speculative
    decoding applies at position 0 only."""
    return (sp.repetition_penalty != 1.0 or sp.presence_penalty != 0.0 or sp.frequency_penalty != 0.0
            or bool(sp.logit_bias))
