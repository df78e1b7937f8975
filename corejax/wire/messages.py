"""What crosses the sandbox boundary, typed: one dataclass and one codec per request kind and per result kind,
the codecs of the results callers see (SamplingParams, Chunk, GenerationResult), and how a request ends when the
worker never finished it (Terminal). corejax/wire/protocol.py frames them; this module gives them meaning.

The worker reads requests with `read_request`; the parent reads results with `read_result(kind, payload)`.
Decoding checks every field's type: what a worker sends is untrusted, and a malformed payload is a
ProtocolError, never an AttributeError deep in a caller."""

from __future__ import annotations

import dataclasses
import enum
import traceback
from collections.abc import Mapping
from typing import Any

import numpy as np

from corejax import errors
from corejax.types.options import SamplingParams
from corejax.types.results import Chunk, GenerationResult, Timings, TokenLogprob
from corejax.wire.protocol import Frame, Kind, ProtocolError
from corejax.types.constraints import Constraint


# Typed payloads: the dataclasses callers see, to and from plain maps.

def sampling_to_wire(sp: SamplingParams) -> dict:
    return dataclasses.asdict(sp)


def sampling_from_wire(d: Mapping[str, Any]) -> SamplingParams:
    d = dict(d)
    d["stop"] = tuple(d.get("stop") or ())
    d["constraint"] = Constraint.from_wire(d.get("constraint"))
    return SamplingParams(**d)


def _logprob_to_wire(lp: TokenLogprob) -> list:
    return [lp.token, lp.text, lp.logprob, [list(t) for t in lp.top], list(lp.top_text)]


def _logprob_from_wire(v: list) -> TokenLogprob:
    token, text, logprob, top, top_text = v
    if len(top_text) != len(top):
        raise ValueError("a logprob's alternatives and their texts differ in number")
    return TokenLogprob(int(token), str(text), float(logprob), tuple((int(t), float(p)) for t, p in top),
                        tuple(str(s) for s in top_text))


def chunk_to_wire(c: Chunk) -> dict:
    return {"text": c.text, "tokens": list(c.tokens), "logprobs": [_logprob_to_wire(lp) for lp in c.logprobs]}


def chunk_from_wire(d: Mapping[str, Any]) -> Chunk:
    try:
        return Chunk(str(d["text"]), tuple(int(t) for t in d["tokens"]),
                     tuple(_logprob_from_wire(v) for v in d["logprobs"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ProtocolError(f"a malformed CHUNK payload: {e!r}") from None


def result_to_wire(r: GenerationResult) -> dict:
    return {
        "text": r.text,
        "tokens": np.asarray(r.tokens, np.int32),
        "finish_reason": r.finish_reason,
        "prompt_tokens": np.asarray(r.prompt_tokens, np.int32),
        "timings": dataclasses.asdict(r.timings),
        "logprobs": None if r.logprobs is None else [_logprob_to_wire(lp) for lp in r.logprobs],
    }


def result_from_wire(d: Mapping[str, Any]) -> GenerationResult:
    try:
        fields = {f.name for f in dataclasses.fields(Timings)}
        timings = Timings(**{k: v for k, v in d["timings"].items() if k in fields})
        lps = d["logprobs"]
        return GenerationResult(
            str(d["text"]), tuple(int(t) for t in d["tokens"]), str(d["finish_reason"]),
            tuple(int(t) for t in d["prompt_tokens"]), timings,
            None if lps is None else tuple(_logprob_from_wire(v) for v in lps))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ProtocolError(f"a malformed RESULT payload: {e!r}") from None


# ----------------------------------------------------------------------------------------------------
# ERROR: a failed request (or, with request id 0, a failed worker)

_ERRORS = {cls.__name__: cls for cls in (
    errors.CorejaxError, errors.ModelFormatError, errors.UnsupportedModelError, errors.InvalidParameterError,
    errors.ContextLengthError, errors.MemoryBudgetError, errors.ModelNotFoundError, errors.SandboxError)}


def clean(text: Any, limit: int = 2000) -> str:
    """A worker's words, made safe to print: no terminal control sequences, bounded length."""
    text = "".join(c if c.isprintable() or c in "\n\t" else "?" for c in str(text))
    return text if len(text) <= limit else text[:limit] + " ..."


MAX_ERROR_CHARS = 4000  # of a worker's error message: with the traceback's 4,000, far inside KIND_LIMITS[ERROR]


def bounded(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """text cut to `limit` characters, saying how much was cut (a hostile file's value can make a message of
    megabytes, and an ERROR frame over its limit would read as a crashed worker, not as the file's fault)."""
    return text if len(text) <= limit else f"{text[:limit]} ... ({len(text) - limit:,} more characters cut)"


def error_to_wire(e: BaseException) -> dict:
    """The worker's side: a corejax error by its class name and sentence; anything else as an internal error
    with the end of its traceback. Both bounded, whatever the error holds."""
    if isinstance(e, errors.CorejaxError):
        return {"type": type(e).__name__, "message": bounded(str(e))}
    return {"type": "InternalError", "message": bounded(f"{type(e).__name__}: {e}"),
            "traceback": "".join(traceback.format_exception(e))[-4000:]}


def error_from_wire(payload: Mapping[str, Any], during: str = "") -> errors.CorejaxError:
    """The parent's side: the same corejax error class with the worker's (cleaned) sentence; an unknown type
    becomes a SandboxError naming it."""
    kind = payload.get("type")
    cls = _ERRORS.get(kind) if isinstance(kind, str) else None
    message = clean(payload.get("message", "no message"))
    if cls is None:
        return errors.SandboxError(f"the worker failed{during}: {clean(payload.get('type'), 80)}: {message}")
    return cls(message)


# ----------------------------------------------------------------------------------------------------
# Requests


def _malformed(what: str, e: Exception) -> ProtocolError:
    return ProtocolError(f"a malformed {what} payload: {e!r}")


def _strs(values: Any) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise TypeError(f"expected a list of strings, got {type(values).__name__}")
    return list(values)


def _opt(value: Any, kind: type) -> Any:
    if value is not None and not isinstance(value, kind):
        raise TypeError(f"expected {kind.__name__} or nothing, got {type(value).__name__}")
    return value


def _req(value: Any, kind: type | tuple) -> Any:
    if not isinstance(value, kind):
        raise TypeError(f"expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


@dataclasses.dataclass(frozen=True)
class Generate:
    KIND = Kind.GENERATE
    prompt: str | None
    messages: list[dict] | None
    sampling: SamplingParams
    speculative: dict | None = None
    tools: list[dict] | None = None  # OpenAI tool objects for the chat template's `tools` variable
    # The parent's own: how it reads the reply (corejax/tools/); never sent.
    reply: Any = dataclasses.field(default=None, compare=False, repr=False)

    def to_wire(self) -> dict:
        return {"prompt": self.prompt, "messages": self.messages, "sampling": sampling_to_wire(self.sampling),
                "speculative": self.speculative, "tools": self.tools}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Generate:
        messages = _opt(d.get("messages"), list)
        tools = _opt(d.get("tools"), list)
        if tools is not None and not all(isinstance(t, dict) for t in tools):
            raise TypeError("tools must be a list of objects")
        return cls(_opt(d.get("prompt"), str), messages, sampling_from_wire(_req(d["sampling"], dict)),
                   _opt(d.get("speculative"), dict), tools)


@dataclasses.dataclass(frozen=True)
class Tokenize:
    KIND = Kind.TOKENIZE
    text: str
    add_special: bool = True

    def to_wire(self) -> dict:
        return {"text": self.text, "add_special": self.add_special}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Tokenize:
        return cls(_req(d["text"], str), bool(d.get("add_special", True)))


@dataclasses.dataclass(frozen=True)
class Detokenize:
    KIND = Kind.DETOKENIZE
    ids: np.ndarray

    def to_wire(self) -> dict:
        return {"ids": np.asarray(self.ids, np.int64)}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Detokenize:
        return cls(_req(d["ids"], np.ndarray))


@dataclasses.dataclass(frozen=True)
class Embed:
    KIND = Kind.EMBED
    texts: list[str]
    truncate: bool = True

    def to_wire(self) -> dict:
        return {"texts": self.texts, "truncate": self.truncate}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Embed:
        return cls(_strs(d["texts"]), bool(d.get("truncate", True)))


@dataclasses.dataclass(frozen=True)
class Classify:
    KIND = Kind.CLASSIFY
    texts: list[str]
    labels: list[str] | None = None
    head: tuple[np.ndarray, np.ndarray] | None = None  # (W [D, L], b [L]) float32
    multi_label: bool | None = None
    template: str | None = None
    truncate: bool = True

    def to_wire(self) -> dict:
        return {"texts": self.texts, "labels": self.labels, "head": None if self.head is None else list(self.head),
                "multi_label": self.multi_label, "template": self.template, "truncate": self.truncate}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Classify:
        labels, head = d.get("labels"), _opt(d.get("head"), list)
        if head is not None:
            w, b = head
            head = (_req(w, np.ndarray), _req(b, np.ndarray))
        return cls(_strs(d["texts"]), None if labels is None else _strs(labels), head,
                   _opt(d.get("multi_label"), bool), _opt(d.get("template"), str), bool(d.get("truncate", True)))


@dataclasses.dataclass(frozen=True)
class Empty:
    """A request without data: INFO, PING, DESCRIBE (and CANCEL, SHUTDOWN, which get no reply)."""

    KIND: Kind

    def to_wire(self) -> dict:
        return {}


REQUESTS = {cls.KIND: cls for cls in (Generate, Tokenize, Detokenize, Embed, Classify)}
AnyRequest = Generate | Tokenize | Detokenize | Embed | Classify | Empty


def read_request(frame: Frame) -> AnyRequest:
    """The typed request a frame carries (the worker's side)."""
    cls = REQUESTS.get(frame.kind)
    if cls is None:
        return Empty(frame.kind)
    try:
        return cls.from_wire(frame.payload)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise _malformed(frame.kind.name, e) from None


# Results: what RESULT carries for each request kind.


@dataclasses.dataclass(frozen=True)
class Tokens:
    ids: list[int]

    def to_wire(self) -> dict:
        return {"ids": np.asarray(self.ids, np.int32)}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Tokens:
        return cls([int(i) for i in _req(d["ids"], np.ndarray)])


@dataclasses.dataclass(frozen=True)
class Text:
    text: str

    def to_wire(self) -> dict:
        return {"text": self.text}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Text:
        return cls(_req(d["text"], str))


@dataclasses.dataclass(frozen=True)
class Info:
    info: dict

    def to_wire(self) -> dict:
        return {"info": self.info}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Info:
        return cls(_req(d["info"], dict))


@dataclasses.dataclass(frozen=True)
class Embeddings:
    embeddings: np.ndarray  # [n, D] float32

    def to_wire(self) -> dict:
        return {"embeddings": self.embeddings}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Embeddings:
        return cls(np.asarray(_req(d["embeddings"], np.ndarray), np.float32))


@dataclasses.dataclass(frozen=True)
class Scores:
    labels: list[str]
    scores: np.ndarray  # [n, L] float32

    def to_wire(self) -> dict:
        return {"labels": self.labels, "scores": self.scores}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Scores:
        return cls(_strs(d["labels"]), np.asarray(_req(d["scores"], np.ndarray), np.float32))


@dataclasses.dataclass(frozen=True)
class Value:
    """PING's nothing (and a test probe's return value: tests/probe_worker.py)."""

    value: Any = None

    def to_wire(self) -> dict:
        return {"value": self.value}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Value:
        return cls(d.get("value"))


@dataclasses.dataclass(frozen=True)
class Generated:
    result: GenerationResult

    def to_wire(self) -> dict:
        return {"result": result_to_wire(self.result)}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Generated:
        return cls(result_from_wire(_req(d["result"], dict)))


RESULTS = {Kind.GENERATE: Generated, Kind.TOKENIZE: Tokens, Kind.DETOKENIZE: Text, Kind.INFO: Info,
           Kind.DESCRIBE: Info, Kind.EMBED: Embeddings, Kind.CLASSIFY: Scores, Kind.PROBE: Value,
           Kind.PING: Value}


def read_result(kind: Kind, payload: Mapping[str, Any]) -> Any:
    """The typed result of a request of this kind (the parent's side: the payload is untrusted)."""
    try:
        return RESULTS[kind].from_wire(payload)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise _malformed(f"{kind.name} result", e) from None


class Ended(enum.Enum):
    """How a request ended without a RESULT or ERROR frame from the worker (the client decides these)."""

    RETRY = "retry"          # the worker died before starting it: safe to send to the next worker
    TIMEOUT = "timeout"      # it ran past the Session's timeout; the worker was stopped
    CRASHED = "crashed"      # the worker died while running it
    CANCELLED = "cancelled"  # the caller cancelled it


@dataclasses.dataclass(frozen=True)
class Terminal:
    """The last event of such a request: why, and a sentence of detail."""

    ended: Ended
    message: str
