"""The exceptions corejax raises for problems a user can cause or fix; each message says what to do."""

from __future__ import annotations


class CorejaxError(Exception):
    """Base class of every error corejax raises on purpose."""


class ModelNotFoundError(CorejaxError, FileNotFoundError):
    """A model name, path or package that cannot be found."""


class ModelFormatError(CorejaxError, ValueError):
    """A model file that is corrupt, truncated, hostile or not in a format corejax reads."""


class UnsupportedModelError(CorejaxError, ValueError):
    """A well-formed model whose architecture, tensor type or tokenizer corejax does not implement."""


class InvalidParameterError(CorejaxError, ValueError):
    """A bad argument: a sampling parameter out of range, a wrong type, an unknown option."""


class ContextLengthError(CorejaxError, ValueError):
    """A prompt (plus the tokens asked for) that does not fit the model's context window."""


class PullError(CorejaxError, RuntimeError):
    """Fetching a model from the package index failed (network, checksum, package contents)."""


class MemoryBudgetError(CorejaxError, MemoryError):
    """A reservation that would exceed the session's declared memory limit."""


class CacheFullError(MemoryBudgetError):
    """The KV page pool cannot hold a request: now (wait, or free sequences) or ever (grow the pool)."""

    def __init__(self, message: str, *, needed: int, available: int, total: int):
        super().__init__(message)
        self.needed, self.available, self.total = needed, available, total


class SandboxError(CorejaxError, RuntimeError):
    """The sandboxed worker could not be started or broke the protocol; the message says which and why."""


class WorkerCrashed(SandboxError):
    """The worker process died (a crash, a kill, the memory limit) while it ran this request."""


class RequestTimeout(SandboxError, TimeoutError):
    """A request ran longer than the Session's timeout; the worker was stopped and will be restarted."""
