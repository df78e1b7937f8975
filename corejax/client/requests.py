"""A Session's requests on the parent's side: the texts of an encoder call in frame-sized batches, a raw request
frame's handle (the kept server relays other processes' requests through it), and cancelling a request from
another thread (asyncio's side of a stream)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

from corejax.client.workers import WorkerClient
from corejax.errors import InvalidParameterError
from corejax.wire import messages as wire
from corejax.wire.messages import Ended
from corejax.wire.protocol import Kind

_BATCH_TEXTS, _BATCH_CHARS = 2048, 4 << 20  # texts per EMBED/CLASSIFY frame, well inside protocol.MAX_FRAME
SESSION_DEFAULT = object()  # speculative= not given to a request: the Session's default applies


def as_texts(texts: Any) -> list[str]:
    """A list of strings (one string is one text), or InvalidParameterError."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Sequence):
        raise InvalidParameterError(f"texts must be a string or a list of strings; got {type(texts).__name__}")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise InvalidParameterError(f"texts must be strings; item {bad} is a {type(texts[bad]).__name__}")
    return list(texts)


def text_batches(texts: list[str]) -> Iterator[list[str]]:
    """Consecutive slices small enough for one frame; always at least one (possibly empty) slice."""
    start, chars = 0, 0
    for i, t in enumerate(texts):
        if i > start and (i - start >= _BATCH_TEXTS or chars + len(t) > _BATCH_CHARS):
            yield texts[start:i]
            start, chars = i, 0
        chars += len(t)
    yield texts[start:]


class RawRequest:
    """Session.open_request's handle: iterate for the reply frames; cancel() (any thread) stops the request and
    ends the iteration; close() after the last frame."""

    def __init__(self, client: WorkerClient, req: Any):
        self.client, self.req = client, req
        self.done = False

    def __iter__(self) -> Iterator[Any]:
        while not self.done:
            event = self.client.wait(self.req)
            self.done = isinstance(event, wire.Terminal) or event.kind in (Kind.RESULT, Kind.ERROR)
            yield event

    def cancel(self) -> None:
        Cancel._stop(self.client, self.req)

    def close(self) -> None:
        if not self.done:
            self.client.forget(self.req)


class Cancel:
    """Stops one request from another thread (asyncio's side of astream_chunks): tells the worker, which frees
    the request's KV pages before its next step, and wakes the thread waiting for the request's frames."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: tuple[WorkerClient, Any] | None = None
        self.cancelled = False

    def track(self, client: WorkerClient, req: Any) -> None:
        with self._lock:
            self._current = (client, req)
            if not self.cancelled:
                return
        self._stop(client, req)

    def __call__(self) -> None:
        with self._lock:
            self.cancelled = True
            current = self._current
        if current is not None:
            self._stop(*current)

    @staticmethod
    def _stop(client: WorkerClient, req: Any) -> None:
        client.forget(req)
        req.events.put(wire.Terminal(Ended.CANCELLED, "the caller cancelled the request"))
