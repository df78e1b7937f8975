r"""Structured output: constrain decoding to a JSON schema, a regular expression, a list of choices or a grammar.

The grammar engine is llguidance (Microsoft's, the one behind guidance and vLLM's `guidance` backend): a Rust
Earley parser over a lexer that computes, per step, the set of vocabulary tokens that keep the output a valid
prefix, as a bitmask of ceil(V / 32) int32 words. Chosen over xgrammar, the other well-kept engine: it has no
dependencies (xgrammar needs torch, transformers and triton), reads every format the API promises (JSON schema,
regex, Lark, llama.cpp's GBNF) and compiles a schema 10-15x faster. xgrammar's precomputed masks are faster per
step, but llguidance's already cost under 4% of a CPU decode step, and constrained decode runs at 0.98-1.00x of
unconstrained on both real models (benchmarks/structured.py compares the two engines on our vocabularies;
docs/ARCHITECTURE.md has the figures).

Masks are computed on the host before each step, not overlapped with it: the step needs the previous step's
token, and so does the mask, so an overlap would need the sampler split from the forward pass into a second
program per step; at under 4% of a step (and ~0 on the device's side) that was not worth a program per shape.

How a constrained request runs (corejax/scheduler.py): the worker builds one `GrammarVocab` per model from the
real tokenizer (each token's bytes; control tokens marked so a grammar never produces them by accident), and one
`Matcher` per request. Before each step the scheduler fills the row's mask (and, with speculative decoding, the
mask after each drafted token); the jitted sampler sets the logits of masked tokens to -inf before top-k/top-p/
temperature (corejax/sampling.py), so any sampling setting draws only grammatical tokens; the sampled tokens
advance the matcher. When the grammar is complete the request ends ("stop"); if no token of the vocabulary can
continue it, the request ends with finish_reason "unsatisfiable" (the text so far is a valid prefix).

Options (SamplingParams.constraint, built by `Constraint.from_options`):
  response_format={"type": "json_schema", "json_schema": {"schema": {...}}} (OpenAI's form; a bare schema is
  accepted too), {"type": "json_object"} (any JSON object), {"type": "text"} (no constraint); regex="..." (Rust
  regex syntax, anchored at both ends, with \d \w \s meaning their ASCII classes);
  choice=["a", "b"]; grammar="..." (Lark as llguidance reads it, or GBNF when it contains `::=`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from corejax.errors import InvalidParameterError

KINDS = ("json_schema", "regex", "choice", "grammar")
FINISH_UNSATISFIABLE = "unsatisfiable"
# JSON: any whitespace between items, but at most this much per gap, so a small model cannot loop on blank
# lines forever (llama.cpp's schema-to-GBNF bounds it the same way).
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,24}"


def _llg() -> Any:
    import llguidance

    return llguidance


@dataclasses.dataclass(frozen=True)
class Constraint:
    """What the output must match: kind in KINDS and its source text (a schema as JSON text, a regex, a JSON
    list of choices, or a Lark/GBNF grammar). Validated on construction: InvalidParameterError says what is
    wrong before any token is generated."""

    kind: str
    source: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidParameterError(f"constraint kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if not isinstance(self.source, str):
            raise InvalidParameterError(f"the {self.kind} constraint must be given as text; got "
                                        f"{type(self.source).__name__}")
        llg = _llg()
        error = llg.LLMatcher.validate_grammar(self.grammar())
        if error:
            raise InvalidParameterError(f"invalid {self.kind.replace('_', ' ')}: {error.strip()}")

    def grammar(self) -> str:
        """The llguidance grammar (its JSON form) for this constraint."""
        llg = _llg()
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.source)
            except ValueError as e:
                raise InvalidParameterError(f"invalid json schema: the text is not JSON ({e})") from None
            own = schema.get("x-guidance", {}) if isinstance(schema, dict) else {}  # the schema's own options win
            bounded = {} if {"whitespace_pattern", "whitespace_flexible"} & set(own) else {
                "whitespace_pattern": JSON_WHITESPACE}
            return llg.LLMatcher.grammar_from_json_schema(self.source, defaults=bounded)
        if self.kind == "regex":  # \d, \w, \s mean their ASCII classes, as in outlines and vLLM
            return llg.LLMatcher.grammar_from_regex(llg.regex_to_lark(self.source, "dws"))
        if self.kind == "choice":
            return llg.grammar_from("choice", self.source)
        try:
            return llg.grammar_from("gbnf" if "::=" in self.source else "lark", self.source)
        except ValueError as e:  # llguidance's GBNF reader
            raise InvalidParameterError(f"invalid grammar: {e}") from None

    def to_wire(self) -> dict:
        return {"kind": self.kind, "source": self.source}

    @classmethod
    def from_wire(cls, value: Any) -> Constraint | None:
        if value is None or isinstance(value, Constraint):
            return value
        return cls(str(value["kind"]), str(value["source"]))

    @classmethod
    def from_options(cls, *, response_format: Any = None, regex: Any = None, choice: Any = None,
                     grammar: Any = None) -> Constraint | None:
        """The one constraint these options ask for (None when none does); more than one is an error."""
        given = [name for name, v in (("response_format", response_format), ("regex", regex), ("choice", choice),
                                      ("grammar", grammar)) if v is not None]
        if len(given) > 1:
            raise InvalidParameterError(f"give at most one of response_format, regex, choice, grammar; got "
                                        f"{', '.join(given)}")
        if response_format is not None:
            return _from_response_format(response_format)
        if regex is not None:
            if not isinstance(regex, str) or not regex:
                raise InvalidParameterError(f"regex must be a non-empty string; got {regex!r}")
            return cls("regex", regex)
        if choice is not None:
            if (isinstance(choice, (str, bytes)) or not isinstance(choice, Sequence) or not choice
                    or not all(isinstance(c, str) and c for c in choice)):
                raise InvalidParameterError(f"choice must be a non-empty list of non-empty strings; got {choice!r}")
            return cls("choice", json.dumps(list(choice)))
        if grammar is not None:
            if not isinstance(grammar, str) or not grammar.strip():
                raise InvalidParameterError("grammar must be a non-empty string (Lark, or GBNF with '::=')")
            return cls("grammar", grammar)
        return None


def _from_response_format(value: Any) -> Constraint | None:
    if not isinstance(value, Mapping) or not isinstance(value.get("type"), str):
        raise InvalidParameterError("response_format must be a dict like {'type': 'json_object'} or "
                                    "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_schema", json.dumps({"type": "object"}))
    if kind != "json_schema":
        raise InvalidParameterError(f"response_format type must be 'text', 'json_object' or 'json_schema'; "
                                    f"got {kind!r}")
    spec = value.get("json_schema")
    if not isinstance(spec, Mapping):
        raise InvalidParameterError("response_format {'type': 'json_schema'} needs 'json_schema': {'name': ..., "
                                    "'schema': {...}}")
    schema = spec.get("schema", spec) if isinstance(spec.get("schema"), Mapping) or "schema" not in spec else None
    if not isinstance(schema, Mapping):
        raise InvalidParameterError("response_format json_schema.schema must be a JSON schema object")
    try:
        text = json.dumps(schema)  # key order kept: properties are generated in the schema's order
    except (TypeError, ValueError) as e:
        raise InvalidParameterError(f"response_format json_schema.schema is not JSON-serialisable: {e}") from None
    return Constraint("json_schema", text)


# ----------------------------------------------------------------------------------------------------
# The worker's side: the vocabulary and one matcher per request


def mask_words(vocab_size: int) -> int:
    """int32 words of one row's token bitmask."""
    return (vocab_size + 31) // 32


class GrammarVocab:
    """llguidance's view of one model's vocabulary: each token id's bytes (V = the model's logit width)."""

    def __init__(self, tokenizer: Any, vocab_size: int):
        from corejax.tokenizer.base import CONTROL, UNKNOWN, UNUSED, USER_DEFINED

        llg = _llg()
        self.vocab_size = vocab_size
        tokens = []
        for i in range(vocab_size):
            if i >= tokenizer.vocab_size:
                tokens.append(b"")
                continue
            piece = tokenizer.token_bytes(i)
            ttype = int(tokenizer.token_types[i])
            if ttype in (CONTROL, UNKNOWN, UNUSED) or (ttype == USER_DEFINED and piece[:1] == b"<"
                                                       and piece[-1:] == b">"):
                piece = b"\xff" + piece  # llguidance's mark for a special token: never matched as text
            tokens.append(piece)

        class _Vocab:  # the duck type llguidance.TokenizerWrapper reads
            eos_token_id = tokenizer.eos_id
            bos_token_id = tokenizer.bos_id
            special_token_ids: list[int] = []

            def __call__(self, text: bytes | str) -> list[int]:
                if isinstance(text, bytes):
                    text = text.decode("utf-8", "replace")
                return tokenizer.encode(text, add_special=False, parse_special=False)

        vocab = _Vocab()
        vocab.tokens = tokens
        self.eos_ids = sorted(tokenizer.eos_ids)
        self.tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(vocab), n_vocab=vocab_size, eos_token=self.eos_ids)
        self.executor = llg.LLExecutor()

    def matcher(self, constraint: Constraint) -> Matcher:
        return Matcher(self, constraint)

    def fill(self, rows: list[tuple[Matcher, int, list[int]]], out: np.ndarray) -> None:
        """Writes each matcher's mask into out[index] ([N, W] int32, C order) and, for its drafted tokens,
        the masks after each of them into out[index + 1 ...]; the matchers end where they started. Runs the
        rows on llguidance's thread pool."""
        if not rows:
            return
        if not out.flags["C_CONTIGUOUS"] or out.dtype != np.int32:
            raise ValueError("the mask array must be C-contiguous int32")
        n, w = out.shape
        plain = [(m.llm, i) for m, i, d in rows if not d]
        drafted = [(m.llm, i, d) for m, i, d in rows if d]
        if plain:
            self.executor.unsafe_compute_mask_ptr(plain, out.ctypes.data, w * 4, n)
        if drafted:
            self.executor.unsafe_compute_mask_ptr_with_draft_token(drafted, out.ctypes.data, w * 4, n)


class Matcher:
    """One request's grammar state."""

    def __init__(self, vocab: GrammarVocab, constraint: Constraint):
        llg = _llg()
        self.vocab = vocab
        self.llm = llg.LLMatcher(vocab.tokenizer, constraint.grammar(), log_level=0)
        if self.llm.is_error():
            raise InvalidParameterError(f"invalid {constraint.kind.replace('_', ' ')}: {self.llm.get_error()}")

    def fork(self) -> Matcher:
        """An independent copy of this grammar state (a draft model drafts under it without moving this one)."""
        twin = object.__new__(Matcher)
        twin.vocab, twin.llm = self.vocab, self.llm.deep_copy()
        return twin

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens` (drafts) the grammar accepts in a row, without consuming them."""
        return self.llm.validate_tokens(tokens) if tokens else 0

    def consume(self, token: int) -> None:
        if not self.llm.consume_token(token):
            raise InvalidParameterError(f"token {token} violates the grammar: {self.llm.get_error()}")

    @property
    def failed(self) -> bool:
        """No token of the vocabulary continues the grammar (llguidance's error state)."""
        return self.llm.is_error()

    @property
    def done(self) -> bool:
        """The grammar is complete and admits nothing more (an end-of-sequence token included)."""
        return self.llm.is_stopped()


def trim_drafts(reqs: list[Any], drafts: dict[int, list[int]]) -> None:
    """Cuts each constrained request's drafts at the first token its grammar rejects: such a draft could never
    be accepted (its position's sample is drawn under the mask), so it is not worth verifying."""
    for req in reqs:
        d = drafts.get(req.rid)
        if d and req.matcher is not None:
            drafts[req.rid] = d[:req.matcher.valid_prefix(d)]


def step_masks(reqs: list[Any], drafts: list[list[int]], rows: Sequence[int], b: int, t: int,
               vocab_size: int) -> np.ndarray | None:
    """A step's token bitmasks [b, t, W] for requests at batch rows `rows`, or None when none is constrained:
    each constrained row's mask at position 0 and after each of its drafts (their time is added to the
    request's times.mask_s); other rows allow everything. A request whose grammar allows no token at all gets
    finish_reason FINISH_UNSATISFIABLE (the scheduler ends it after the step)."""
    constrained = [(req, d, i) for req, d, i in zip(reqs, drafts, rows) if req.matcher is not None]
    if not constrained:
        return None
    started = time.perf_counter()
    masks = np.full((b * t, mask_words(vocab_size)), -1, np.int32)
    for _, _, i in constrained:
        masks[i * t:(i + 1) * t] = 0
    constrained[0][0].matcher.vocab.fill([(req.matcher, i * t, d) for req, d, i in constrained], masks)
    share = (time.perf_counter() - started) / len(constrained)
    for req, _, i in constrained:
        req.times.mask_s += share
        if req.matcher.failed or not masks[i * t].any():
            req.finish_reason = FINISH_UNSATISFIABLE
    return masks.reshape(b, t, -1)
