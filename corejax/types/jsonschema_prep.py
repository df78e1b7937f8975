"""A JSON schema as real-world files write it, normalised into what llguidance compiles exactly, or refused.

llguidance (corejax/serving/structured.py) compiles Draft 2020-12 and refuses what it cannot enforce; it already
ignores keywords it does not know (annotations: `description`, `markdownDescription`, `defaultSnippets`, `x-*`,
...). What it refuses or misreads in files such as SchemaStore's is rewritten here into an equivalent schema:

- `additionalProperties`: where a schema lists `properties` (or `patternProperties`) and does not say, only the
  listed (and required) properties are generated (OpenAI's strict mode and xgrammar do the same: a small model
  otherwise keeps inventing keys and never closes the object); `"additionalProperties": true` keeps the
  JSON-schema meaning. Objects that are joined (`allOf`, `$ref` beside other keys, `anyOf`/`oneOf` beside
  `properties`) are closed once, on the joining schema, over every property its parts list, so a part never
  forbids another part's keys.
- `oneOf` whose branches cannot both match (different types, different `const`/`enum` values of a property
  both require, or a property one requires and the other forbids) becomes `anyOf`: then the two are the same
  set (corejax/types/jsonschema_oneof.py, which also handles branches that overlap only where oneOf rejects
  anyway). Otherwise it stays `oneOf`, and llguidance accepts it only where it can prove the same, or says so.
  Coercing every `oneOf` (llguidance's `coerce_one_of`) could generate a value that matches two branches, which
  the schema rejects; a schema can still ask for it with `"x-guidance": {"coerce_one_of": true}`.
- an unknown `format` (`uri-reference`, `regex`, `color`, ...) is a plain string: in JSON schema a format is an
  annotation unless a validator opts in, and llguidance refuses the ones it does not implement.
- `dependencies`/`dependentRequired`/`dependentSchemas` become `anyOf` (the key absent, or the key and what it
  needs); `propertyNames` is checked against every property a closed object may have; `uniqueItems: false`,
  `contains: {}`, `if` without `then`/`else` and similar no-ops go, and `$schema` too (llguidance would fetch a
  2019-09 meta-schema), as do annotations beside a `$ref` (llguidance refuses siblings of a recursive `$ref`).
- `$ref`s are local only: a remote one is refused with its URL (corejax never fetches); a local one whose name
  is not a valid URI (`#/definitions/Map<K,V>`) is percent-encoded.

What no grammar can enforce (`uniqueItems: true`, `not`, `if/then/else`, `contains` with a schema,
`unevaluated*`, draft-3 keywords, ...) is refused with an error naming the keyword and where it is, never
dropped; `"x-guidance": {"lenient": true}` (llguidance's switch) ignores such keywords when the caller accepts
outputs that may break them.
"""
from __future__ import annotations

import copy
import re
from typing import Any
from urllib.parse import quote, unquote

from corejax.errors import InvalidParameterError
from corejax.types.jsonschema_oneof import node_list, one_of_as_any_of, pointer, resolve

# llguidance's formats (docs/json_schema.md in its repository); any other is generated as a plain string.
FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid", "uri"})
# Annotations removed everywhere (llguidance ignores them too, but not beside a recursive $ref).
ANNOTATIONS = frozenset({
    "title", "description", "markdownDescription", "default", "examples", "example", "$comment", "deprecated",
    "deprecationMessage", "readOnly", "writeOnly", "defaultSnippets", "enumDescriptions",
    "markdownEnumDescriptions", "errorMessage", "patternErrorMessage", "doNotSuggest", "suggestSortText",
    "allowComments", "allowTrailingCommas", "tsType", "contentMediaType", "contentEncoding", "contentSchema",
    "$vocabulary", "$schema", "$dynamicAnchor", "$recursiveAnchor", "format"})
# Keywords whose value is one subschema, a list of them, or a map of names to them.
ONE = ("additionalProperties", "additionalItems", "items", "not", "if", "then", "else", "contains",
       "propertyNames", "unevaluatedProperties", "unevaluatedItems")
MANY = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
NAMED = ("properties", "patternProperties", "definitions", "$defs", "dependentSchemas")
JOINS = ("allOf", "anyOf", "oneOf")
# Draft 3 keywords that llguidance would ignore although they constrain.
DRAFT3 = ("extends", "disallow", "divisibleBy")
# Characters a URI fragment may hold as they are (RFC 3986 pchar, '/' and '?'); others are percent-encoded.
FRAGMENT_SAFE = "/?:@!$&'()*+,;=-._~%"


def prepare(schema: Any) -> Any:
    """The schema normalised for llguidance (a new object; the caller's is not changed)."""
    if isinstance(schema, bool) or not isinstance(schema, dict):
        return schema
    root = copy.deepcopy(schema)
    guidance = root.pop("x-guidance", None)
    ids = {v.split("#")[0] for v in (root.get("$id"), root.get("id")) if isinstance(v, str) and v}
    lenient = isinstance(guidance, dict) and guidance.get("lenient") is True
    for node, where in list(_nodes(root, "#")):
        _clean(node, where, ids, lenient)
    _Walk(root, _joined_parts(root), lenient).node(root, "#")
    refs = {unquote(n["$ref"]) for n, _ in _nodes(root, "#") if isinstance(n.get("$ref"), str)}
    for node, where in _nodes(root, "#"):
        if not any(ref.startswith(f"{where}/oneOf/") for ref in refs):  # a $ref into a branch keeps its path
            one_of_as_any_of(root, node)
    if guidance is not None:
        root = {"x-guidance": guidance, **root}
    return root


def _refuse(keyword: str, where: str, why: str) -> InvalidParameterError:
    return InvalidParameterError(f"{keyword} at {where} {why}")


def _clean(node: dict, where: str, ids: set[str], lenient: bool) -> None:
    """Drops annotations, ids and unknown formats; makes $refs local; refuses draft-3 and dynamic keywords."""
    for key in [k for k in node if k in ANNOTATIONS or (k.startswith("x-") and k != "x-guidance")]:
        if key == "format" and (not isinstance(node[key], str) or node[key] in FORMATS):
            continue
        del node[key]
    # Every $ref becomes a fragment of the whole document (a remote one is refused), so an id no longer
    # changes how one resolves; nested ids in these files are labels ("id": "#/properties/app"), or a draft-4
    # plain name ("id": "#item"), which is an $anchor now.
    for key in ("$id", "id"):
        if isinstance(node.get(key), str):
            value = node.pop(key)
            if re.fullmatch(r"#[A-Za-z_][-A-Za-z0-9._]*", value):
                node.setdefault("$anchor", value[1:])
    if "$ref" in node:
        node["$ref"] = _local_ref(node["$ref"], where, ids)
    if lenient:  # llguidance's switch: what it cannot enforce is ignored, at the caller's request
        return
    for key in DRAFT3:
        if key in node:
            raise _refuse(key, where, "is a draft-3 keyword corejax does not read; write it in Draft 2020-12 "
                                      "(divisibleBy is multipleOf, extends is allOf)")
    if isinstance(node.get("required"), bool):
        raise _refuse("required", where, "is a draft-3 boolean; list required properties in the object's "
                                         "'required' array instead")
    for key in ("$dynamicRef", "$recursiveRef"):
        if key in node:
            raise _refuse(key, where, "is not supported; use a $ref to '#/$defs/...' instead")


def _local_ref(ref: Any, where: str, ids: set[str]) -> str:
    if not isinstance(ref, str):
        raise _refuse("$ref", where, f"must be a string; got {ref!r}")
    base, _, fragment = ref.partition("#")
    if base and base not in ids:
        raise _refuse("$ref", where, f"points to {ref!r}, which is not in this schema: corejax never fetches "
                                     f"schemas, so put the referenced schema under '$defs' and refer to it as "
                                     f"'#/$defs/...'")
    return "#" + quote(fragment, safe=FRAGMENT_SAFE)


class _Walk:
    def __init__(self, root: dict, joined: set[int], lenient: bool):
        self.root, self.joined, self.lenient = root, joined, lenient

    def node(self, node: Any, where: str) -> None:
        if not isinstance(node, dict):
            return
        self.children(node, where)
        self.keywords(node, where)
        if id(node) not in self.joined:
            self.close(node)
        self.property_names(node, where)

    def children(self, node: dict, where: str) -> None:
        for key in ONE:
            if isinstance(node.get(key), dict):
                self.node(node[key], f"{where}/{key}")
        for key in MANY:
            if isinstance(node.get(key), list):
                for i, sub in enumerate(node[key]):
                    self.node(sub, f"{where}/{key}/{i}")
        for key in NAMED:
            if isinstance(node.get(key), dict):
                for name, sub in node[key].items():
                    self.node(sub, f"{where}/{key}/{_escape(name)}")
        if isinstance(node.get("dependencies"), dict):
            for name, sub in node["dependencies"].items():
                self.node(sub, f"{where}/dependencies/{_escape(name)}")

    def keywords(self, node: dict, where: str) -> None:
        """Rewrites constraining keywords llguidance does not compile into ones it does, or refuses them."""
        if isinstance(node.get("dependencies"), dict):
            for name, need in node.pop("dependencies").items():
                key = "dependentRequired" if isinstance(need, list) else "dependentSchemas"
                node.setdefault(key, {})[name] = need
        needs = []
        for name, need in (_mapping(node, "dependentRequired")).items():
            if isinstance(need, list) and need:
                needs.append({"anyOf": [{"properties": {name: False}}, {"required": [name, *need]}]})
        for name, need in (_mapping(node, "dependentSchemas")).items():
            if need is not True and need != {}:
                needs.append({"anyOf": [{"properties": {name: False}},
                                        {"allOf": [{"required": [name]}, need]}]})
        if needs:
            node["allOf"] = [*node_list(node, "allOf"), *needs]
        if node.get("uniqueItems") is True and isinstance(node.get("maxItems"), int) and node["maxItems"] <= 1:
            del node["uniqueItems"]
        if node.get("uniqueItems") is False:
            del node["uniqueItems"]
        if "contains" in node and node["contains"] in (True, {}) and "minContains" not in node:
            del node["contains"]
            node["minItems"] = max(node["minItems"], 1) if isinstance(node.get("minItems"), int) else 1
        if "contains" not in node:
            node.pop("minContains", None)
            node.pop("maxContains", None)
        if "if" in node and "then" not in node and "else" not in node:
            del node["if"]
        if "if" not in node:
            node.pop("then", None)
            node.pop("else", None)
        for key in ("propertyNames", "unevaluatedProperties", "unevaluatedItems"):
            if node.get(key) in (True, {}):
                del node[key]
        if node.get("unevaluatedProperties") is False and not any(k in node for k in (*JOINS, "$ref")):
            node.setdefault("additionalProperties", False)
            del node["unevaluatedProperties"]
        refused = {
            "uniqueItems": "cannot be enforced while generating (no grammar can keep items distinct)",
            "not": "cannot be enforced while generating (a grammar cannot exclude a schema)",
            "if": "(with then/else) cannot be enforced while generating; write the cases as 'anyOf'",
            "contains": "with a schema cannot be enforced while generating; use 'prefixItems' or 'items'",
            "unevaluatedProperties": "is not supported beside allOf/anyOf/oneOf/$ref; use 'additionalProperties'",
            "unevaluatedItems": "is not supported; use 'items'",
        }
        for key, why in refused.items():
            if key in node and not self.lenient:
                raise _refuse(key, where, f"{why}; remove it, or put \"x-guidance\": {{\"lenient\": true}} at the "
                                          f"schema's top to ignore what cannot be enforced")

    def close(self, node: dict) -> None:
        """The additionalProperties default: only the properties the schema (or the parts it joins) lists."""
        if ("additionalProperties" in node or "unevaluatedProperties" in node
                or not any(k in node for k in ("properties", "patternProperties", "allOf"))
                or not isinstance(node.get("properties", {}), dict)):
            return
        names = _listed(self.root, node, set())
        if names is None:
            return
        props = node.setdefault("properties", {})
        for name in names:
            props.setdefault(name, True)
        node["additionalProperties"] = False

    def property_names(self, node: dict, where: str) -> None:
        if "propertyNames" not in node or self.lenient:
            return
        rule = resolve(self.root, node["propertyNames"])
        if node.get("additionalProperties") is False and not node.get("patternProperties"):
            props = node.get("properties", {})
            for name in list(props):
                if not _name_ok(rule, name, where):
                    props[name] = False
            del node["propertyNames"]
            return
        if (isinstance(rule, dict) and set(rule) <= {"type", "pattern"} and "pattern" in rule
                and not node.get("patternProperties") and id(node) not in self.joined):
            extra = node.get("additionalProperties", True)
            node["patternProperties"] = {rule["pattern"]: extra}
            node["additionalProperties"] = False
            for name in list(node.get("properties", {})):
                if not _name_ok(rule, name, where):
                    node["properties"][name] = False
            del node["propertyNames"]
            return
        raise _refuse("propertyNames", where, "is only supported on an object whose keys are all listed or match "
                                              "one 'pattern'; list the allowed keys in 'properties' instead")


def _mapping(node: dict, key: str) -> dict:
    """Pops a keyword whose value is a map (left in place, for llguidance to refuse, when it is not one)."""
    return node.pop(key) if isinstance(node.get(key), dict) else {}


def _name_ok(rule: Any, name: str, where: str) -> bool:
    """Whether a property name satisfies a propertyNames schema (the keywords a name can meet; Python's re, as
    the jsonschema package uses)."""
    if rule is True or rule == {}:
        return True
    if rule is False:
        return False
    known = {"type", "pattern", "enum", "const", "minLength", "maxLength"}
    if not isinstance(rule, dict) or not set(rule) <= known:
        raise _refuse("propertyNames", where, f"uses {sorted(set(rule) - known) if isinstance(rule, dict) else rule}"
                                              f"; only type, pattern, enum, const, minLength, maxLength are supported")
    return ((rule.get("type", "string") == "string" or "string" in rule.get("type", []))
            and ("pattern" not in rule or re.search(rule["pattern"], name) is not None)
            and ("enum" not in rule or name in rule["enum"]) and ("const" not in rule or name == rule["const"])
            and len(name) >= rule.get("minLength", 0) and len(name) <= rule.get("maxLength", len(name)))


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def _targets(root: dict, node: dict) -> list:
    return [t for t in [pointer(root, node["$ref"])] if isinstance(t, dict)] if isinstance(
        node.get("$ref"), str) else []


def _joined_parts(root: dict) -> set[int]:
    """ids of the schemas that are parts of a join: allOf members, anyOf/oneOf branches beside properties, a
    $ref's target beside other keys, dependent schemas, and (transitively) what those parts join or refer to."""
    parts: list = []
    for node, _ in _nodes(root, "#"):
        parts += node_list(node, "allOf")
        if _joins_branches(node):
            parts += node_list(node, "anyOf") + node_list(node, "oneOf")
        if set(node) - {"$ref", "definitions", "$defs", "$anchor", "type"}:  # a $ref beside other keywords
            parts += _targets(root, node)
        for key in ("dependentSchemas", "dependencies"):
            if isinstance(node.get(key), dict):
                parts += [v for v in node[key].values() if isinstance(v, dict)]
    seen: set[int] = set()
    while parts:
        part = parts.pop()
        if not isinstance(part, dict) or id(part) in seen:
            continue
        seen.add(id(part))
        parts += node_list(part, "allOf") + _targets(root, part)
        if _joins_branches(part):
            parts += node_list(part, "anyOf") + node_list(part, "oneOf")
    return seen


def _joins_branches(node: dict) -> bool:
    """Whether a schema's anyOf/oneOf branches are joined with keys it lists (its own, its allOf's, its $ref's)."""
    return any(k in node for k in ("properties", "patternProperties", "allOf", "$ref"))


def _listed(root: dict, node: dict, seen: set[int]) -> set[str] | None:
    """The property names a schema and the parts it joins list, or None when it must stay open: none of them
    lists any (a free map, `{"type": "object"}` included) or one admits any key."""
    if id(node) in seen:
        return set()
    seen.add(id(node))
    own = "properties" in node or "patternProperties" in node
    names = set(node["properties"]) if isinstance(node.get("properties"), dict) else set()
    names |= {n for n in node_list(node, "required") if isinstance(n, str)}  # required but not described
    found = own
    parts = node_list(node, "allOf") + _targets(root, node)
    if _joins_branches(node):
        parts += node_list(node, "anyOf") + node_list(node, "oneOf")
    for part in parts:
        if not isinstance(part, dict):
            continue
        if "additionalProperties" in part and part["additionalProperties"] is not False:
            return None
        more = _listed(root, part, seen)
        if more is None:
            if "properties" in part or "patternProperties" in part:
                return None
            continue
        names |= more
        found = True
    return names if found else None


def _nodes(node: Any, where: str):
    """Every subschema (depth first) with its location."""
    if not isinstance(node, dict):
        return
    yield node, where
    for key in ONE:
        if isinstance(node.get(key), dict):
            yield from _nodes(node[key], f"{where}/{key}")
    for key in MANY:
        for i, sub in enumerate(node_list(node, key)):
            yield from _nodes(sub, f"{where}/{key}/{i}")
    for key in (*NAMED, "dependencies"):
        if isinstance(node.get(key), dict):
            for name, sub in node[key].items():
                yield from _nodes(sub, f"{where}/{key}/{_escape(name)}")


