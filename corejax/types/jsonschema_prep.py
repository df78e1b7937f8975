"""A JSON schema as real-world files write it, normalised into what llguidance compiles exactly, or refused.

llguidance (corejax/serving/structured.py) compiles Draft 2020-12 and refuses what it cannot enforce; it already
ignores keywords it does not know (annotations: `description`, `markdownDescription`, `defaultSnippets`, `x-*`,
...). What it refuses or misreads in files such as SchemaStore's is rewritten here into an equivalent schema:

- `additionalProperties`: where a schema lists `properties` and does not say, only the listed properties are
  generated (OpenAI's strict mode and xgrammar do the same: a small model otherwise keeps inventing keys and
  never closes the object); `"additionalProperties": true` keeps the JSON-schema meaning. Objects that are
  joined (`allOf`, `$ref` beside other keys, `anyOf`/`oneOf` beside `properties`) are closed once, on the
  joining schema, over every property its parts list, so a part never forbids another part's keys.
- `oneOf` whose branches cannot both match (different types, different `const`/`enum` values of a property
  both require, or a property one requires and the other forbids) becomes `anyOf`: then the two are the same
  set. Otherwise it stays `oneOf`, and llguidance accepts it only where it can prove the same, or says so.
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
from urllib.parse import quote

from corejax.errors import InvalidParameterError

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
    for node, _ in _nodes(root, "#"):
        if isinstance(node.get("oneOf"), list) and "anyOf" not in node:
            try:
                disjoint = _disjoint(root, node["oneOf"])
            except RecursionError:  # branches that refer to themselves all the way down: not proven
                disjoint = False
            branches = node["oneOf"]
            if disjoint:
                node["anyOf"] = node.pop("oneOf")
            elif (len(branches) > 1 and all(_object_only(root, b) for b in branches)
                  and _disjoint(root, branches, objects=True)):
                # A non-object meets every branch (their keywords speak of objects), so matches them all and
                # oneOf rejects it: objects only, whose branches are apart, is the same set.
                node["anyOf"] = [_typed_object(b) for b in node.pop("oneOf")]
            elif (exclusive := _exclusive_keys(branches)) is not None:
                node.pop("oneOf")
                node["anyOf"] = exclusive
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
        rule = _resolve(self.root, node["propertyNames"])
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


def _resolve(root: dict, node: Any) -> Any:
    """Follows a schema that is only a local $ref to the schema it names (as it is when unresolvable)."""
    for _ in range(64):
        if not (isinstance(node, dict) and set(node) == {"$ref"} and isinstance(node["$ref"], str)):
            break
        target = _pointer(root, node["$ref"])
        if target is None:
            break
        node = target
    return node


def _pointer(root: dict, ref: str) -> Any:
    from urllib.parse import unquote

    if not ref.startswith("#"):
        return None
    node: Any = root
    for part in unquote(ref[1:]).split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _targets(root: dict, node: dict) -> list:
    return [t for t in [_pointer(root, node["$ref"])] if isinstance(t, dict)] if isinstance(
        node.get("$ref"), str) else []


def _joined_parts(root: dict) -> set[int]:
    """ids of the schemas that are parts of a join: allOf members, anyOf/oneOf branches beside properties, a
    $ref's target beside other keys, dependent schemas, and (transitively) what those parts join or refer to."""
    parts: list = []
    for node, _ in _nodes(root, "#"):
        parts += node_list(node, "allOf")
        if "properties" in node or "patternProperties" in node:
            parts += node_list(node, "anyOf") + node_list(node, "oneOf")
        if "properties" in node or "patternProperties" in node:
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
        parts += node_list(part, "allOf")
        if "properties" in part or "patternProperties" in part:
            parts += node_list(part, "anyOf") + node_list(part, "oneOf") + _targets(root, part)
        elif set(part) == {"$ref"} or "allOf" in part:
            parts += _targets(root, part)
    return seen


def node_list(node: dict, key: str) -> list:
    return node[key] if isinstance(node.get(key), list) else []


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
    parts = node_list(node, "allOf")
    if own or set(node) == {"$ref"} or "allOf" in node:
        parts += _targets(root, node)
    if own:
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


# --- oneOf: branches that cannot both match ---------------------------------------------------------------

TYPES = ("null", "boolean", "object", "array", "string", "number")
OBJECT_ONLY = frozenset({"properties", "required", "additionalProperties", "patternProperties", "minProperties",
                         "maxProperties", "propertyNames", "$anchor"})


def _types(root: dict, node: Any) -> set[str]:
    """The JSON types a schema can match ("integer" counted as "number"), all when unsure."""
    node = _resolve(root, node)
    if node is False:
        return set()
    if not isinstance(node, dict):
        return set(TYPES)
    found = set(TYPES)
    t = node.get("type")
    if isinstance(t, str):
        t = [t]
    if isinstance(t, list):
        found &= {"number" if x == "integer" else x for x in t}
    values = [node["const"]] if "const" in node else node.get("enum") if isinstance(node.get("enum"), list) else None
    if values is not None:
        found &= {_type_of(v) for v in values}
    for part in node_list(node, "allOf"):
        found &= _types(root, part)
    for key in ("anyOf", "oneOf"):
        if key in node:
            found &= set().union(*(_types(root, b) for b in node_list(node, key)))
    return found


def _type_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", list: "array", str: "string"}.get(type(value), "string")


def _values(root: dict, node: Any) -> list | None:
    """The values a schema lists (const, enum, or a union of branches that all list theirs), or None."""
    node = _resolve(root, node)
    if not isinstance(node, dict):
        return None
    if "const" in node:
        return [node["const"]]
    if isinstance(node.get("enum"), list):
        return node["enum"]
    for key in ("anyOf", "oneOf"):
        branches = [_values(root, b) for b in node_list(node, key)]
        if branches and all(v is not None for v in branches):
            return [v for vs in branches for v in vs]
    return None


def _rejects(root: dict, node: Any, value: Any) -> bool:
    """Whether the schema surely rejects the value (its type, listed values, pattern or length)."""
    node = _resolve(root, node)
    if node is False:
        return True
    if not isinstance(node, dict):
        return False
    if _type_of(value) not in _types(root, node):
        return True
    listed = _values(root, node)
    if listed is not None and not any(_same(value, v) for v in listed):
        return True
    if isinstance(value, str):
        if isinstance(node.get("pattern"), str):
            try:
                if re.search(node["pattern"], value) is None:
                    return True
            except re.error:
                pass
        if len(value) < node.get("minLength", 0) or len(value) > node.get("maxLength", len(value)):
            return True
    return any(_rejects(root, part, value) for part in node_list(node, "allOf"))


def _required(root: dict, node: dict) -> set[str]:
    """The keys a schema requires, its allOf parts' included."""
    names = set(node["required"]) if isinstance(node.get("required"), list) else set()
    for part in node_list(node, "allOf"):
        part = _resolve(root, part)
        if isinstance(part, dict):
            names |= _required(root, part)
    return names


def _property(root: dict, node: dict, name: str) -> Any:
    """The schema of one property, looked for in the schema and its allOf parts (None when none gives one)."""
    if isinstance(node.get("properties"), dict) and node["properties"].get(name, True) is not True:
        return node["properties"][name]
    for part in node_list(node, "allOf"):
        part = _resolve(root, part)
        found = _property(root, part, name) if isinstance(part, dict) else None
        if found is not None:
            return found
    return None


def _forbids(node: dict, name: str) -> bool:
    props = node["properties"] if isinstance(node.get("properties"), dict) else {}
    if props.get(name) is False:
        return True
    return name not in props and node.get("additionalProperties") is False and not node.get("patternProperties")


def _apart(root: dict, a: Any, b: Any, objects: bool = False) -> bool:
    """Whether no value (no object, with `objects`) can match both schemas: a sufficient check on types, listed
    values against the other schema, and, for objects only, a key one requires and the other forbids or a key
    both require with values apart."""
    both = _types(root, a) & _types(root, b) & ({"object"} if objects else set(TYPES))
    if not both:
        return True
    for x, y in ((a, b), (b, a)):
        values = _values(root, x)
        if values is not None and all(_rejects(root, y, v) for v in values):
            return True
    a, b = _resolve(root, a), _resolve(root, b)
    if not isinstance(a, dict) or not isinstance(b, dict) or not both <= {"object"}:
        return False  # e.g. a string meets both branches' object keywords
    ra, rb = _required(root, a), _required(root, b)
    if any(_forbids(b, name) for name in ra) or any(_forbids(a, name) for name in rb):
        return True
    for name in ra & rb:
        pa, pb = _property(root, a, name), _property(root, b, name)
        if pa is not None and pb is not None and _apart(root, pa, pb):
            return True
    return False


def _exclusive_keys(branches: list) -> list | None:
    """`oneOf` of `required` lists ("exactly one of these keys"), as `anyOf` branches that each forbid the
    one key that would make another branch match too; None for any other oneOf."""
    if not all(isinstance(b, dict) and set(b) == {"required"} and isinstance(b["required"], list)
               for b in branches):
        return None
    sets = [set(b["required"]) for b in branches]
    if not all(len(sets[j] - sets[i]) == 1 for i in range(len(sets)) for j in range(len(sets)) if i != j):
        return None
    return [{"type": "object", "required": b["required"],  # a non-object would meet every branch
             "properties": {k: False for j, other in enumerate(sets) if j != i for k in other - sets[i]}}
            for i, b in enumerate(branches)]


def _same(x: Any, y: Any) -> bool:
    return _type_of(x) == _type_of(y) and x == y


def _disjoint(root: dict, branches: list, objects: bool = False) -> bool:
    return all(_apart(root, branches[i], branches[j], objects) for i in range(len(branches))
               for j in range(i + 1, len(branches)))


def _object_only(root: dict, branch: Any) -> bool:
    """Whether the branch has only object keywords (so every non-object meets it)."""
    branch = _resolve(root, branch)
    return isinstance(branch, dict) and bool(branch) and set(branch) <= OBJECT_ONLY


def _typed_object(branch: dict) -> dict:
    return {"type": "object", "allOf": [branch]} if set(branch) == {"$ref"} else {"type": "object", **branch}
