"""Session's asyncio methods: each waits on a worker thread, so the event loop never blocks; closing an async
stream cancels its request in the worker at once."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

from corejax.client.requests import SESSION_DEFAULT, Cancel
from corejax.types.results import Chunk, GenerationResult


class AsyncSession:
    """Mixed into Session (client/session.py), whose generate, _generation, _chunks and close it calls."""

    async def agenerate(self, prompt: str | None = None, *, messages: Sequence[dict] | None = None,
                        **sampling: Any) -> GenerationResult:
        """generate for asyncio code: waits on a worker thread, never blocks the event loop."""
        return await asyncio.to_thread(self.generate, prompt, messages=messages, **sampling)

    async def astream_chunks(self, prompt: str | None = None, *, messages: Sequence[dict] | None = None,
                             speculative: Any = SESSION_DEFAULT, **sampling: Any) -> AsyncIterator[Chunk]:
        """stream_chunks for asyncio code. Closing the iterator (or cancelling the task reading it) stops the
        request in the worker at once, freeing its KV pages: a server cancels a disconnected client's request."""
        cancel = Cancel()
        if messages is not None and self._format is None:  # the first chat asks the worker for its chat format
            await asyncio.to_thread(self._chat_format)
        chunks = self._chunks(self._generation(prompt, messages, speculative, sampling), cancel)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def hand(item: tuple) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the loop closed (the program is exiting): nobody is reading any more
                stop.set()

        def pump() -> None:
            try:
                for chunk in chunks:
                    hand(("chunk", chunk))
                    if stop.is_set():
                        break
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
                hand(("error", e))
            finally:
                chunks.close()
                hand(("end", None))

        thread = threading.Thread(target=pump, name="corejax-astream", daemon=True)
        thread.start()
        try:
            while True:
                what, value = await q.get()
                if what == "end":
                    return
                if what == "error":
                    raise value
                yield value
        finally:  # the caller stopped reading (a closed HTTP connection, a cancelled task): the worker stops now
            stop.set()
            cancel()

    async def astream(self, prompt: str | None = None, *, messages: Sequence[dict] | None = None,
                      **sampling: Any) -> AsyncIterator[str]:
        """stream for asyncio code: `async for piece in session.astream(...)`."""
        async for chunk in self.astream_chunks(prompt, messages=messages, **sampling):
            if chunk.text:
                yield chunk.text

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.close)
