"""Session: one loaded model, many requests. In-process today; the sandbox issue moves the Runtime it
drives into a worker subprocess behind the same methods."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

from corejax import hub
from corejax.errors import CorejaxError
from corejax.results import Chunk, GenerationResult
from corejax.config import SamplingParams


class Session:
    """`Session(model)` loads `model` (a registry name, a .gguf path or an HF folder; None = the default)."""

    def __init__(self, model: str | None = None, *, progress: bool = True):
        from corejax.runtime import Runtime  # JAX is imported only when a session starts

        self.source = hub.resolve(model, progress=progress)
        self._runtime = Runtime(self.source, progress=progress)
        # One request runs at a time until the scheduler batches them; the lock keeps threads safe.
        self._lock = threading.Lock()
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise CorejaxError("this Session is closed; create a new one")

    def stream_chunks(self, prompt: str | None = None, *, messages: Sequence[dict] | None = None,
                      **sampling: Any) -> Iterator[Chunk]:
        """Chunks with text, token ids and logprobs; the last one carries the GenerationResult."""
        self._check_open()
        sp = SamplingParams.from_kwargs(**sampling)
        with self._lock:
            yield from self._runtime.stream(prompt, messages, sp)

    def stream(self, prompt: str | None = None, *, messages: Sequence[dict] | None = None,
               **sampling: Any) -> Iterator[str]:
        """Yields text pieces as they are generated (never half a UTF-8 character, never a stop string)."""
        for chunk in self.stream_chunks(prompt, messages=messages, **sampling):
            if chunk.text:
                yield chunk.text

    def generate(self, prompt: str | None = None, *, messages: Sequence[dict] | None = None,
                 **sampling: Any) -> GenerationResult:
        """Runs one request to completion. Sampling keywords: see corejax.SamplingParams."""
        result = None
        for chunk in self.stream_chunks(prompt, messages=messages, **sampling):
            result = chunk.result or result
        assert result is not None
        return result

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        self._check_open()
        return self._runtime.tokenizer.encode(text, add_special=add_special)

    def detokenize(self, ids: Sequence[int]) -> str:
        self._check_open()
        return self._runtime.tokenizer.decode(list(ids))

    def info(self) -> dict[str, Any]:
        self._check_open()
        return self._runtime.info()

    def close(self) -> None:
        self._closed = True
        self._runtime = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
