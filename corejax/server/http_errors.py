"""corejax's exceptions as the HTTP errors a client can act on (OpenAI's shape; each API re-shapes ApiError)."""

from __future__ import annotations

import logging

from corejax import errors
from corejax.server.schema import ApiError


def api_error(e: BaseException) -> ApiError:
    """corejax's exceptions as OpenAI errors with the HTTP status a client can act on."""
    message = str(e)
    if isinstance(e, ApiError):
        return e
    if isinstance(e, errors.ContextLengthError):
        return ApiError(400, message, code="context_length_exceeded", param="messages")
    if isinstance(e, errors.CacheFullError):
        return ApiError(400, message, code="kv_cache_too_small")
    if isinstance(e, (errors.InvalidParameterError, errors.UnsupportedModelError)):
        return ApiError(400, message, param=getattr(e, "param", None))  # a ToolError names its field
    if isinstance(e, errors.RequestTimeout):
        return ApiError(504, message, type="server_error", code="timeout")
    if isinstance(e, errors.SandboxError):  # WorkerCrashed among them: the next request starts a new worker
        return ApiError(503, message, type="server_error", code="worker_crashed", headers={"Retry-After": "1"})
    if isinstance(e, errors.CorejaxError):
        return ApiError(500, message, type="server_error")
    logging.getLogger("corejax.server").error("unexpected %s: %s", type(e).__name__, e)
    return ApiError(500, f"internal server error ({type(e).__name__})", type="server_error")
