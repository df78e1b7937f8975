"""The one-call API: generate / stream over a Session kept per model, so repeated calls do not reload.

The model runs in a sandboxed worker subprocess by default (corejax/sandbox/); sandbox=False runs it in
this process (faster to start, no isolation from the model file).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

from corejax.results import Classification
from corejax.session import Session

DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"

_sessions: dict[tuple[str | None, bool], Session] = {}
_sessions_lock = threading.Lock()


def get_session(model: str | None = None, *, sandbox: bool = True) -> Session:
    """The shared Session for `model` (created on first use; None = the default model)."""
    key = (None if model is None else str(model), bool(sandbox))
    with _sessions_lock:
        if key not in _sessions:
            _sessions[key] = Session(model, sandbox=sandbox)
        return _sessions[key]


def generate(prompt: str | None = None, model: str | None = None, *, messages: Sequence[dict] | None = None,
             sandbox: bool = True, **sampling: Any) -> str:
    """Generates text for `prompt` (or chat `messages`) and returns it. Sampling keywords: SamplingParams."""
    return get_session(model, sandbox=sandbox).generate(prompt, messages=messages, **sampling).text


def stream(prompt: str | None = None, model: str | None = None, *, messages: Sequence[dict] | None = None,
           sandbox: bool = True, **sampling: Any) -> Iterator[str]:
    """Like generate, yielding text pieces as they are produced."""
    return get_session(model, sandbox=sandbox).stream(prompt, messages=messages, **sampling)


def embed(texts: str | Sequence[str], model: str | None = DEFAULT_EMBEDDING_MODEL, *, truncate: bool = True,
          sandbox: bool = True) -> Any:
    """Sentence embeddings: np.ndarray float32 [n, D] for n texts ([D] for one string); see Session.embed."""
    return get_session(model or DEFAULT_EMBEDDING_MODEL, sandbox=sandbox).embed(texts, truncate=truncate)


def classify(texts: str | Sequence[str], model: str | None = None, *, labels: Sequence[str] | None = None,
             head: Any = None, multi_label: bool | None = None, template: str | None = None,
             truncate: bool = True, sandbox: bool = True) -> Classification | list[Classification]:
    """Labels with scores for each text; see Session.classify. With no model: zero-shot with the default
    generative model, or with head=(W, b) the default embedding model."""
    if model is None and head is not None:
        model = DEFAULT_EMBEDDING_MODEL
    return get_session(model, sandbox=sandbox).classify(texts, labels=labels, head=head, multi_label=multi_label,
                                                        template=template, truncate=truncate)
