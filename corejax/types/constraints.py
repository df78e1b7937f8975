r"""What a structured-output request asks for: a Constraint (a JSON schema, a regular expression, a list of
choices or a grammar), validated by the grammar engine, llguidance, when it is built. Plain data that crosses the
process boundary; the worker's side (the vocabulary, a matcher per request, the step masks) is
corejax/serving/structured.py.

Options (SamplingParams.constraint, built by `Constraint.from_options`):
  response_format={"type": "json_schema", "json_schema": {"schema": {...}}} (OpenAI's form; a bare schema is
  accepted too; corejax/types/jsonschema_prep.py normalises it: only listed properties unless
  "additionalProperties" says otherwise, annotations and unknown formats ignored, remote $refs refused),
  {"type": "json_object"} (any JSON object), {"type": "text"} (no constraint); regex="..." (Rust regex syntax,
  anchored at both ends, with \d \w \s meaning their ASCII classes);
  choice=["a", "b"]; grammar="..." (Lark as llguidance reads it, or GBNF when it contains `::=`).
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from corejax.errors import InvalidParameterError
from corejax.types.jsonschema_prep import prepare

KINDS = ("json_schema", "regex", "choice", "grammar")
# JSON: any whitespace between items, but at most this much per gap, so a small model cannot loop on blank
# lines forever (llama.cpp's schema-to-GBNF bounds it the same way).
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,24}"


def grammar_engine() -> Any:
    """llguidance, imported when the first constraint is built (a Rust extension: its import is not free)."""
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
        llg = grammar_engine()
        error = llg.LLMatcher.validate_grammar(self.grammar())
        if error:
            if "coerce_one_of" in error:  # llguidance's switch, as a schema sets it
                error = (f"{error.strip()} (the branches may both match: to accept that, put \"x-guidance\": "
                         f"{{\"coerce_one_of\": true}} at the schema's top)")
            raise InvalidParameterError(f"invalid {self.kind.replace('_', ' ')}: {error.strip()}")

    def grammar(self) -> str:
        """The llguidance grammar (its JSON form) for this constraint."""
        llg = grammar_engine()
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.source)
            except ValueError as e:
                raise InvalidParameterError(f"invalid json schema: the text is not JSON ({e})") from None
            try:
                schema = prepare(schema)  # real-world schemas -> what llguidance compiles exactly, or refused
            except InvalidParameterError as e:
                raise InvalidParameterError(f"invalid json schema: {e}") from None
            except (TypeError, AttributeError, KeyError, RecursionError, re.error) as e:  # a malformed keyword
                raise InvalidParameterError(f"invalid json schema: a keyword has a value of the wrong kind "
                                            f"({type(e).__name__}: {e})") from None
            own = schema.get("x-guidance", {}) if isinstance(schema, dict) else {}  # the schema's own options win
            if not isinstance(own, dict):
                raise InvalidParameterError(f"invalid json schema: x-guidance must be an object of llguidance's "
                                            f"options (e.g. {{\"whitespace_flexible\": false}}); got {own!r}")
            bounded = {} if {"whitespace_pattern", "whitespace_flexible"} & set(own) else {
                "whitespace_pattern": JSON_WHITESPACE}
            return llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=bounded)
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
