"""A request's generations as the server streams them: Choices pumps the n (times prompts) generations of one
request into one queue; ChunkStream is a stream's chunk objects whose end frees its place; sse frames them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request

from corejax.client.session import Session
from corejax.server import http_errors, schema
from corejax.server.schema import ApiError, GenerationRequest
from corejax.types.results import Chunk, GenerationResult

_api_error = http_errors.api_error


class Choices:
    """The n (times prompts) generations of one request, each pumped from its own astream_chunks into one
    queue, so a stream interleaves choices as their tokens come."""

    def __init__(self, session: Session, req: GenerationRequest):
        self.session, self.req = session, req
        self.plan = req.choices()
        self.count = len(self.plan)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks = [asyncio.create_task(self._pump(i, prompt, kw)) for i, prompt, kw in self.plan]

    async def _pump(self, index: int, prompt: str | None, kw: dict) -> None:
        try:
            chunks = self.session.astream_chunks(prompt, messages=self.req.messages, **kw)
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    await self.queue.put((index, chunk))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            await self.queue.put((index, e))

    async def first_events(self) -> list:
        """Waits until every choice has its first chunk (the prefill ran) or one fails (raised as an ApiError)."""
        first, seen = [], set()
        while len(seen) < self.count:
            index, item = await self.queue.get()
            if isinstance(item, Exception):
                raise _api_error(item)
            first.append((index, item))
            seen.add(index)
        return first

    async def events(self, first: list, remaining: Callable[[], float | None]) -> AsyncIterator[tuple[int, Any]]:
        """(choice, Chunk or Exception) to the last choice's result; a shutdown past its grace ends it early."""
        pending = set(range(self.count))
        backlog = list(first)
        while pending:
            if backlog:
                index, item = backlog.pop(0)
            else:
                left = remaining()
                try:
                    index, item = await asyncio.wait_for(self.queue.get(), left)
                except TimeoutError:
                    yield -1, ApiError(503, "the server is shutting down; this stream was cut",
                                       type="server_error", code="server_shutdown")
                    return
            if isinstance(item, Exception) or (isinstance(item, Chunk) and item.result is not None):
                pending.discard(index)
            yield index, item
            if isinstance(item, Exception):
                return

    async def results(self, request: Request) -> list[tuple[int, GenerationResult]]:
        """Every choice's result (a non-streaming request), cancelled if the client goes away meanwhile."""
        watch = asyncio.create_task(self._watch_disconnect(request))
        results: dict[int, GenerationResult] = {}
        try:
            while len(results) < self.count:
                index, item = await self.queue.get()
                if isinstance(item, Exception):
                    raise _api_error(item)
                if item.result is not None:
                    results[index] = item.result
        finally:
            watch.cancel()
        return sorted(results.items())

    async def _watch_disconnect(self, request: Request) -> None:
        """Waits for the client to close the connection (the body was read: the next ASGI message is the
        disconnect), then ends the wait in results() with a 499."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        await self.queue.put((-1, ApiError(499, "the client closed the connection")))

    def cancel(self) -> None:
        """Stops every choice still generating: each task's astream_chunks tells its worker (synchronous, so
        it also works from a cancelled scope, where no await may run)."""
        for task in self.tasks:
            task.cancel()


class ChunkStream:
    """A stream's chunk objects, an async iterator. Its end, its aclose() or its being dropped unread ends its
    generations in the workers, frees its place in flight and logs the request (finish, which runs once): a
    client that leaves before the first chunk was asked for leaves a generator that never started, whose own
    finally would never run."""

    def __init__(self, items: AsyncIterator[dict], finish: Callable[[], None]):
        self._items, self._finish = items, finish

    def __aiter__(self) -> ChunkStream:
        return self

    async def __anext__(self) -> dict:
        return await self._items.__anext__()

    async def aclose(self) -> None:
        await self._items.aclose()  # type: ignore[attr-defined]
        self._finish()

    def __del__(self) -> None:
        self._finish()


async def sse(chunks: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    """OpenAI's server-sent events of a stream's chunk objects, then [DONE]."""
    async with contextlib.aclosing(chunks):
        async for c in chunks:
            yield schema.sse(c)
    yield schema.SSE_DONE
