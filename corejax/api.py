"""The one-call API: generate / stream / embed / classify over a Session kept per model, so repeated calls do not
reload.

The model runs in a sandboxed worker subprocess by default (corejax/sandbox/), kept loaded in a background
process for keep_alive seconds (corejax/client/keepalive.py: the next script on the same model starts at once);
sandbox=False runs it in this process (no isolation from the model file).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

from corejax.errors import InvalidParameterError
from corejax.types.results import Classification
from corejax.client.session import Session

DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"

_sessions: dict[tuple[str | None, bool, Any], Session] = {}
_sessions_lock = threading.Lock()


def get_session(model: str | None = None, *, sandbox: bool = True, keep_alive: float | str | None = None) -> Session:
    """The shared Session for `model` (created on first use; None = the default model). keep_alive: see Session."""
    key = (None if model is None else str(model), bool(sandbox), keep_alive)
    with _sessions_lock:
        if key not in _sessions:
            _sessions[key] = Session(model, sandbox=sandbox, keep_alive=keep_alive)
        return _sessions[key]


def _text_only(sampling: dict) -> None:
    """These return text alone, so tools (whose calls are not text) are refused rather than lost."""
    if sampling.get("tools"):
        raise InvalidParameterError("corejax.generate and corejax.stream return only text, so a tool call would be "
                                    "lost; use corejax.Session(model).generate(messages=..., tools=...), whose "
                                    "result has tool_calls")


def generate(prompt: str | None = None, model: str | None = None, *, messages: Sequence[dict] | None = None,
             sandbox: bool = True, keep_alive: float | str | None = None, **sampling: Any) -> str:
    """Generates text for `prompt` (or chat `messages`) and returns it. Sampling keywords: SamplingParams."""
    _text_only(sampling)
    session = get_session(model, sandbox=sandbox, keep_alive=keep_alive)
    return session.generate(prompt, messages=messages, **sampling).text


def stream(prompt: str | None = None, model: str | None = None, *, messages: Sequence[dict] | None = None,
           sandbox: bool = True, keep_alive: float | str | None = None, **sampling: Any) -> Iterator[str]:
    """Like generate, yielding text pieces as they are produced."""
    _text_only(sampling)
    return get_session(model, sandbox=sandbox, keep_alive=keep_alive).stream(prompt, messages=messages, **sampling)


def embed(texts: str | Sequence[str], model: str | None = DEFAULT_EMBEDDING_MODEL, *, truncate: bool = True,
          sandbox: bool = True, keep_alive: float | str | None = None) -> Any:
    """Sentence embeddings: np.ndarray float32 [n, D] for n texts ([D] for one string); see Session.embed."""
    session = get_session(model or DEFAULT_EMBEDDING_MODEL, sandbox=sandbox, keep_alive=keep_alive)
    return session.embed(texts, truncate=truncate)


def classify(texts: str | Sequence[str], model: str | None = None, *, labels: Sequence[str] | None = None,
             head: Any = None, multi_label: bool | None = None, template: str | None = None,
             truncate: bool = True, sandbox: bool = True,
             keep_alive: float | str | None = None) -> Classification | list[Classification]:
    """Labels with scores for each text; see Session.classify. With no model: zero-shot with the default
    generative model, or with head=(W, b) the default embedding model."""
    if model is None and head is not None:
        model = DEFAULT_EMBEDDING_MODEL
    session = get_session(model, sandbox=sandbox, keep_alive=keep_alive)
    return session.classify(texts, labels=labels, head=head, multi_label=multi_label, template=template,
                            truncate=truncate)
