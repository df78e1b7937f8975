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


# What a parser's own code raises when a file holds a value of a type or range it did not expect (a list where a
# name belongs, a string for a size, a huge integer): read as the file's fault, not as a bug of corejax.
_MALFORMED = (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError, ZeroDivisionError,
              RecursionError)


def reads_untrusted(what: str):
    """Decorator for a function that reads a file's contents: an exception of _MALFORMED escaping it becomes a
    ModelFormatError naming `what` (corejax's own errors pass through unchanged)."""
    import functools

    def wrap(fn):
        @functools.wraps(fn)
        def reader(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except CorejaxError:
                raise
            except _MALFORMED as e:
                raise ModelFormatError(f"{what} holds a value corejax cannot read ({type(e).__name__}: "
                                       f"{str(e)[:300]}); the file is corrupt or not of a kind corejax runs") from None

        return reader

    return wrap
