"""Per-request generation options — SamplingParams and SpeculativeConfig — validated in the caller's process
(no JAX here: the parent checks a request before it is sent). corejax.types.config re-exports them."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from corejax.errors import InvalidParameterError
from corejax.types.constraints import Constraint

GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20
_PENALTY_LIMIT = 2.0  # OpenAI's documented range for presence/frequency penalties.
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for logit_bias; -100 bans a token (engine/sampling.py), +100 forces it


# ----------------------------------------------------------------------------------------------------
# SamplingParams (host side, user facing)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v: Any) -> bool:
    return _is_int(v) or (isinstance(v, (float, np.floating)))


def _check_real(name: str, v: Any, ok: bool, allowed: str) -> None:
    try:
        finite_or_inf = _is_real(v) and not math.isnan(float(v))
    except OverflowError:  # an int beyond float range
        finite_or_inf = False
    if not finite_or_inf or not ok:
        raise InvalidParameterError(f"{name} must be {allowed}; got {v!r}")


def _check_int(name: str, v: Any, ok: bool, allowed: str) -> None:
    if not _is_int(v) or not ok:
        raise InvalidParameterError(f"{name} must be {allowed}; got {v!r}")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to choose each next token of one request; validated on construction."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    ignore_eos: bool = False
    constraint: Constraint | None = None  # structured output (corejax/serving/structured.py); from_kwargs builds it
    # Added to the logits of these token ids before sampling: {id: bias in [-100, 100]} (OpenAI's logit_bias;
    # -100 bans the token, +100 forces it); kept as sorted (id, bias) pairs so the params stay hashable.
    logit_bias: tuple[tuple[int, float], ...] = ()

    # Keywords from_kwargs turns into `constraint` (at most one of them).
    CONSTRAINT_OPTIONS = ("response_format", "regex", "choice", "grammar")

    def __post_init__(self) -> None:
        t = self.temperature
        _check_real("temperature", t, _is_real(t) and 0 <= t < math.inf,
                    "a finite number >= 0 (0 = greedy)")
        _check_int("top_k", self.top_k, _is_int(self.top_k) and self.top_k >= 0,
                   "an integer >= 0 (0 = off)")
        p = self.top_p
        _check_real("top_p", p, _is_real(p) and 0 < p <= 1, "in (0, 1] (1 = off)")
        m = self.min_p
        _check_real("min_p", m, _is_real(m) and 0 <= m <= 1, "in [0, 1] (0 = off)")
        r = self.repetition_penalty
        _check_real("repetition_penalty", r, _is_real(r) and 0 < r < math.inf,
                    "a finite number > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _check_real(name, v, _is_real(v) and -_PENALTY_LIMIT <= v <= _PENALTY_LIMIT,
                        f"in [-{_PENALTY_LIMIT:g}, {_PENALTY_LIMIT:g}] (0 = off)")
        if self.seed is not None:
            _check_int("seed", self.seed, _is_int(self.seed) and 0 <= self.seed < 2**64,
                       "None or an integer in [0, 2**64)")
        _check_int("max_tokens", self.max_tokens, _is_int(self.max_tokens) and self.max_tokens >= 1,
                   "an integer >= 1")
        if self.logprobs is not None:
            lp = self.logprobs
            _check_int("logprobs", lp, _is_int(lp) and 0 <= lp <= MAX_LOGPROBS,
                       f"None (off) or an integer in [0, {MAX_LOGPROBS}]")
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise InvalidParameterError(f"ignore_eos must be True or False; got {self.ignore_eos!r}")
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise InvalidParameterError(f"constraint must be a corejax.types.constraints.Constraint or None; got "
                                        f"{type(self.constraint).__name__} (pass response_format=, regex=, choice= "
                                        "or grammar= instead)")
        object.__setattr__(self, "stop", _normalise_stop(self.stop))
        object.__setattr__(self, "logit_bias", _normalise_logit_bias(self.logit_bias))
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("top_k", "max_tokens", "seed", "logprobs"):
            v = getattr(self, name)
            object.__setattr__(self, name, None if v is None else int(v))
        object.__setattr__(self, "ignore_eos", bool(self.ignore_eos))

    @classmethod
    def from_kwargs(cls, **kw: Any) -> SamplingParams:
        """Builds SamplingParams from keyword arguments, rejecting names it does not know."""
        valid = [f.name for f in dataclasses.fields(cls)] + list(cls.CONSTRAINT_OPTIONS)
        unknown = sorted(set(kw) - set(valid))
        if unknown:
            raise InvalidParameterError(
                f"unknown sampling parameter(s) {', '.join(map(repr, unknown))}; "
                f"valid names are: {', '.join(valid)}")
        options = {name: kw.pop(name) for name in cls.CONSTRAINT_OPTIONS if name in kw}
        if options:
            if kw.get("constraint") is not None:
                raise InvalidParameterError("give constraint= or one of response_format/regex/choice/grammar, "
                                            "not both")
            kw["constraint"] = Constraint.from_options(**options)
        return cls(**kw)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS


def _normalise_stop(stop: Any) -> tuple[str, ...]:
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)):
        raise InvalidParameterError(
            f"stop must be a string or a list of non-empty strings; got {type(stop).__name__}")
    for s in stop:
        if not isinstance(s, str) or not s:
            raise InvalidParameterError(
                f"stop must be a string or a list of non-empty strings; got {s!r} in it")
    return tuple(stop)


def _normalise_logit_bias(bias: Any) -> tuple[tuple[int, float], ...]:
    """{token id: bias} (ids as ints or decimal strings, OpenAI's JSON keys) or (id, bias) pairs -> sorted pairs.
    Whether the ids are in the model's vocabulary is checked where the vocabulary is known (the worker)."""
    what = "logit_bias must be a dict {token_id: bias} with integer token ids >= 0 and biases in [-100, 100]"
    if bias is None:
        return ()
    if isinstance(bias, Mapping):
        items = list(bias.items())
    elif isinstance(bias, (list, tuple)) and all(isinstance(x, (list, tuple)) and len(x) == 2 for x in bias):
        items = [tuple(x) for x in bias]
    else:
        raise InvalidParameterError(f"{what}; got {type(bias).__name__}")
    out: dict[int, float] = {}
    for key, value in items:
        token = key
        if isinstance(key, str):
            token = int(key) if key.strip().isdigit() else None
        if not _is_int(token) or token < 0:
            raise InvalidParameterError(f"{what}; got the key {key!r}")
        _check_real(f"logit_bias[{key!r}]", value,
                    _is_real(value) and -LOGIT_BIAS_LIMIT <= float(value) <= LOGIT_BIAS_LIMIT, "in [-100, 100]")
        out[int(token)] = float(value)
    return tuple(sorted(out.items()))


def check_logit_bias(sp: SamplingParams, vocab_size: int, model: str) -> None:
    """Every logit_bias token id must be one of the model's (the worker checks before it queues a request)."""
    outside = [t for t, _ in sp.logit_bias if t >= vocab_size]
    if outside:
        raise InvalidParameterError(f"logit_bias names token id {outside[0]}, outside the vocabulary of {model} "
                                    f"(ids 0 to {vocab_size - 1})")


def check_prompt(prompt: Any, messages: Any) -> None:
    """The one check of a request's text: exactly one of a prompt string or a list of chat message dicts
    (the Session checks before sending, the Runtime again in the worker, with the same sentences)."""
    if (prompt is None) == (messages is None):
        raise InvalidParameterError("give exactly one of prompt (a string) or messages (a list of dicts)")
    if messages is not None and (isinstance(messages, (str, bytes)) or not isinstance(messages, (list, tuple))
                                 or not all(isinstance(m, dict) for m in messages)):
        raise InvalidParameterError("messages must be a list of dicts like {'role': 'user', 'content': 'Hi'}")
    if prompt is not None and not isinstance(prompt, str):
        raise InvalidParameterError(f"prompt must be a string; got {type(prompt).__name__}")


SPECULATIVE_METHODS = ("ngram", "draft")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """speculative={"method": "ngram" | "draft", "k": ..., ...} as a Session or request option.

    k: the most tokens drafted per step (adaptive: the start value and the ceiling).
    draft_model: for "draft", a model name or path sharing the target's tokenizer (None: the target model
    itself, loaded with draft_weights — e.g. "int8" — as its own cheaper copy).
    ngram_max / ngram_min: for "ngram", the longest and shortest suffix looked up in the prompt and output."""

    method: str
    k: int = 4
    adaptive: bool = True
    draft_model: str | None = None
    draft_weights: str | None = None
    ngram_max: int = 4
    ngram_min: int = 2

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise InvalidParameterError(f"speculative method must be 'ngram' or 'draft'; got {self.method!r}")
        for name, lo, hi in (("k", 1, 15), ("ngram_max", 1, 16), ("ngram_min", 1, 16)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise InvalidParameterError(f"speculative {name} must be an integer in [{lo}, {hi}]; got {value!r}")
        if self.ngram_min > self.ngram_max:
            raise InvalidParameterError(f"speculative ngram_min ({self.ngram_min}) must be <= ngram_max "
                                        f"({self.ngram_max})")
        if not isinstance(self.adaptive, bool):
            raise InvalidParameterError(f"speculative adaptive must be True or False; got {self.adaptive!r}")
        if self.method == "ngram" and (self.draft_model is not None or self.draft_weights is not None):
            raise InvalidParameterError("draft_model/draft_weights are for method 'draft'; 'ngram' needs no model")
        if self.method == "draft" and self.draft_model is None and self.draft_weights is None:
            raise InvalidParameterError(
                "speculative method 'draft' needs draft_model (a smaller model with the same tokenizer) or "
                "draft_weights (the same model at lower precision, e.g. 'int8')")

    @classmethod
    def from_user(cls, value: Any) -> SpeculativeConfig | None:
        """None, a SpeculativeConfig, or a dict of its fields (anything else: InvalidParameterError)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, Mapping):
            raise InvalidParameterError(
                f"speculative must be a dict like {{'method': 'ngram', 'k': 4}}; got {type(value).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown or "method" not in value:
            raise InvalidParameterError(
                f"speculative takes the keys {', '.join(sorted(names))} ('method' required); "
                f"got {', '.join(map(repr, sorted(value)))}")
        return cls(**dict(value))

    def to_wire(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def draft_key(self) -> tuple:
        return (self.draft_model, self.draft_weights)

    @property
    def proposer_key(self) -> tuple:
        """Requests with equal keys share one proposer (corejax/serving/speculative.py)."""
        if self.method == "ngram":
            return ("ngram", self.ngram_max, self.ngram_min)
        return ("draft", *self.draft_key)
