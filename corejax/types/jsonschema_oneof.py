"""`oneOf` as `anyOf` where the two are the same set of values: no value can match two branches (checked
conservatively: types, listed values, keys one branch requires and another forbids), or they can only on values
that match every branch, which oneOf rejects anyway. Used by corejax/types/jsonschema_prep.py; also home of the
local `$ref` helpers both modules use."""
from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote


def resolve(root: dict, node: Any) -> Any:
    """Follows a schema that is only a local $ref to the schema it names (as it is when unresolvable)."""
    for _ in range(64):
        if not (isinstance(node, dict) and set(node) == {"$ref"} and isinstance(node["$ref"], str)):
            break
        target = pointer(root, node["$ref"])
        if target is None:
            break
        node = target
    return node


def pointer(root: dict, ref: str) -> Any:
    """The subschema a local $ref (a JSON pointer fragment, percent-encoded or not) names, or None."""
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


def node_list(node: dict, key: str) -> list:
    return node[key] if isinstance(node.get(key), list) else []


def one_of_as_any_of(root: dict, node: dict) -> None:
    """Rewrites the node's oneOf as anyOf where that is the same set of values; leaves it otherwise."""
    branches = node.get("oneOf")
    if not isinstance(branches, list) or "anyOf" in node:
        return
    try:
        disjoint = _disjoint(root, branches)
        as_objects = (not disjoint and len(branches) > 1 and all(_object_only(root, b) for b in branches)
                      and _disjoint(root, branches, objects=True))
    except RecursionError:  # branches that refer to themselves all the way down: not proven
        disjoint = as_objects = False
    if disjoint:
        node["anyOf"] = node.pop("oneOf")
    elif as_objects:
        # A non-object meets every branch (their keywords speak of objects), so it matches them all and oneOf
        # rejects it: objects only, on which the branches are apart, is the same set.
        node["anyOf"] = [_typed_object(b) for b in node.pop("oneOf")]
    elif (exclusive := _exclusive_keys(branches)) is not None:
        node.pop("oneOf")
        node["anyOf"] = exclusive


# --- oneOf: branches that cannot both match ---------------------------------------------------------------

TYPES = ("null", "boolean", "object", "array", "string", "number")
OBJECT_ONLY = frozenset({"properties", "required", "additionalProperties", "patternProperties", "minProperties",
                         "maxProperties", "propertyNames", "$anchor"})


def _types(root: dict, node: Any) -> set[str]:
    """The JSON types a schema can match ("integer" counted as "number"), all when unsure."""
    node = resolve(root, node)
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
    node = resolve(root, node)
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
    node = resolve(root, node)
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
        part = resolve(root, part)
        if isinstance(part, dict):
            names |= _required(root, part)
    return names


def _property(root: dict, node: dict, name: str) -> Any:
    """The schema of one property, looked for in the schema and its allOf parts (None when none gives one)."""
    if isinstance(node.get("properties"), dict) and node["properties"].get(name, True) is not True:
        return node["properties"][name]
    for part in node_list(node, "allOf"):
        part = resolve(root, part)
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
    a, b = resolve(root, a), resolve(root, b)
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
    branch = resolve(root, branch)
    return isinstance(branch, dict) and bool(branch) and set(branch) <= OBJECT_ONLY


def _typed_object(branch: dict) -> dict:
    return {"type": "object", "allOf": [branch]} if set(branch) == {"$ref"} else {"type": "object", **branch}
