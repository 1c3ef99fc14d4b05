"""The JSON-schema keywords that structured outputs enforce, checked before a schema is compiled.

xgrammar 0.2.9 compiles a JSON schema into a grammar but silently ignores some JSON-schema 2020-12 keywords, so its
output could be invalid for the schema the client sent (`allOf` of a string and an integer gave a number; `not` and
an external `$ref` were ignored). A client that asks for a schema gets output valid for it or a ValueError naming
the keyword and its place, e.g. "structured_outputs.json: the keyword 'not' at #/properties/a is not supported".

What xgrammar does and does not enforce was found by compiling, for each keyword, a schema where ignoring it lets an
invalid instance through, and checking that instance against the grammar (see tests/test_structured_output.py):
- enforced: type (also as a list), enum, const, properties, required, additionalProperties, patternProperties,
  propertyNames, unevaluatedProperties, minProperties/maxProperties, items, prefixItems, unevaluatedItems,
  minItems/maxItems, minLength/maxLength, pattern, minimum/maximum and their exclusive forms, multipleOf on
  integers without a range, anyOf, allOf of one member, oneOf (as anyOf: allowed only where its members are disjoint), format
  (where xgrammar knows it; otherwise it is an annotation, as 2020-12's default format vocabulary says), $ref to a
  JSON pointer in the same document ("#" or "#/...").
- refused: not, if/then/else, dependentSchemas, dependentRequired, dependencies, contains, minContains,
  maxContains, uniqueItems: true, additionalItems, $dynamicRef/$dynamicAnchor (and draft 2019's recursive forms),
  allOf of several members, $ref to anything but a local JSON pointer, $id below the root (it would change what a
  $ref means), multipleOf on numbers or beside a range (xgrammar drops it), minLength/maxLength beside pattern
  or format (dropped too), and assertions xgrammar drops when they stand beside $ref, anyOf/oneOf/allOf
  or enum/const, or (string and number keywords, required) where no type says which values they apply to.
Annotations (title, description, default, examples, $comment, deprecated, readOnly, writeOnly, content*) and
keywords unknown to JSON schema are allowed: they assert nothing.
"""
from __future__ import annotations

from typing import Any

REFUSED = frozenset({"not", "if", "then", "else", "dependentSchemas", "dependentRequired", "dependencies", "contains",
                     "minContains", "maxContains", "additionalItems", "$dynamicRef", "$dynamicAnchor",
                     "$recursiveRef", "$recursiveAnchor"})
# keywords that constrain an instance (2020-12 applicators and validation); the others are annotations or unknown
ASSERTIONS = frozenset({"type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum",
                        "exclusiveMinimum", "maxLength", "minLength", "pattern", "maxItems", "minItems", "uniqueItems",
                        "maxProperties", "minProperties", "required", "properties", "patternProperties",
                        "additionalProperties", "propertyNames", "unevaluatedProperties", "items", "prefixItems",
                        "unevaluatedItems", "allOf", "anyOf", "oneOf", "$ref"}) | REFUSED
UNTYPED_IGNORED = ("minLength", "maxLength", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                   "multipleOf", "required")
RANGE = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
OBJECT_HINTS = ("properties", "additionalProperties", "patternProperties")  # xgrammar infers "object" from these
SUBSCHEMA = ("additionalProperties", "propertyNames", "unevaluatedProperties", "items", "unevaluatedItems")
SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
SUBSCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf")
JSON_TYPES = {"null": type(None), "boolean": bool, "object": dict, "array": list, "string": str}


def check_json_schema(schema: Any) -> None:
    """Raise ValueError ("structured_outputs.json: the keyword 'K' at #/path is not supported...") for the first
    keyword in schema that the grammar engine would not enforce; return None for a schema it enforces fully.
    Malformed parts it cannot judge (a "type" of objects, a "required" that is no list) are left to the compiler."""
    try:
        _check(schema, schema, "#")
    except RecursionError:
        raise ValueError("structured_outputs.json is not valid: the schema is nested too deeply") from None


def _refuse(keyword: str, path: str, why: str = "") -> ValueError:
    return ValueError(f"structured_outputs.json: the keyword {keyword!r} at {path} is not supported{why}")


def _check(node: Any, root: Any, path: str) -> None:
    if not isinstance(node, dict):
        return
    for key in node:
        if key in REFUSED:
            raise _refuse(key, path)
    if node.get("uniqueItems", False) is not False:
        raise _refuse("uniqueItems", path)
    if "$id" in node and path != "#":
        raise _refuse("$id", path, " below the schema's root")
    _check_siblings(node, path)
    if "multipleOf" in node and not (_integer_only(node.get("type")) and isinstance(node["multipleOf"], int)):
        raise _refuse("multipleOf", path, " except on an integer type with an integer divisor")
    if "multipleOf" in node and _has(node, RANGE):
        raise _refuse("multipleOf", path, f" beside {next(k for k in RANGE if k in node)!r}")
    for shape in ("pattern", "format"):
        if shape in node and _has(node, ("minLength", "maxLength")):
            raise _refuse("minLength" if "minLength" in node else "maxLength", path, f" beside {shape!r}")
    if "type" not in node:
        ignored = [k for k in UNTYPED_IGNORED if k in node and not (k == "required" and _has(node, OBJECT_HINTS))]
        if ignored:
            raise _refuse(ignored[0], path, " without a 'type'")
    if "$ref" in node:
        _check_ref(node["$ref"], path)
    if "oneOf" in node:
        _check_one_of(node["oneOf"], root, path)
    for key in SUBSCHEMA:
        _check(node.get(key), root, f"{path}/{key}")
    for key in SUBSCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            for name, sub in node[key].items():
                _check(sub, root, f"{path}/{key}/{_escape(name)}")
    for key in SUBSCHEMA_LISTS:
        if isinstance(node.get(key), list):
            for i, sub in enumerate(node[key]):
                _check(sub, root, f"{path}/{key}/{i}")


def _check_siblings(node: dict, path: str) -> None:
    """xgrammar reads only $ref, a composition (anyOf/oneOf/allOf), or enum/const where a schema has one: the other
    assertions beside it would be dropped."""
    if "allOf" in node and (not isinstance(node["allOf"], list) or len(node["allOf"]) != 1):
        raise _refuse("allOf", path, " with more than one member")
    for lead in ("$ref", "anyOf", "oneOf", "allOf"):
        if lead in node:
            others = sorted(k for k in node if k in ASSERTIONS and k != lead)
            if others:
                raise _refuse(others[0], path, f" beside {lead!r}")
    for lead in ("enum", "const"):
        if lead in node:
            others = sorted(k for k in node if k in ASSERTIONS and k not in ("type", "enum", "const"))
            if others:
                raise _refuse(others[0], path, f" beside {lead!r}")
            values = node["enum"] if lead == "enum" and isinstance(node["enum"], list) else [node.get(lead)]
            if "type" in node and not all(_is_type(v, node["type"]) for v in values):
                raise _refuse("type", path, f" beside {lead!r} values of another type")


def _check_ref(ref: Any, path: str) -> None:
    if not (isinstance(ref, str) and (ref == "#" or ref.startswith("#/"))):
        raise _refuse("$ref", path, f": only references within the schema ('#/...') are, not {str(ref)[:100]!r}")


def _check_one_of(members: Any, root: Any, path: str) -> None:
    """oneOf is generated as anyOf, which is right only when no value matches two members: their types must not
    overlap, or they must be objects told apart by a required property's const."""
    if not isinstance(members, list):
        return
    resolved = [_resolve(m, root) for m in members]
    types = [_types(m) for m in resolved]
    if all(t is not None for t in types) and all(not (a & b) for i, a in enumerate(types) for b in types[i + 1:]):
        return
    if _discriminated(resolved):
        return
    raise _refuse("oneOf", path, " unless its members' types do not overlap or a required property's const tells "
                                 "them apart")


def _types(schema: Any) -> set[str] | None:
    """The JSON types a schema's values can have ("integer" counted as "number"), or None where unknown."""
    if not isinstance(schema, dict):
        return None
    if "type" in schema:
        t = schema["type"]
        names = {n for n in t if isinstance(n, str)} if isinstance(t, list) else {t} if isinstance(t, str) else set()
        if not names:
            return None
    elif "const" in schema or isinstance(schema.get("enum"), list):
        values = [schema["const"]] if "const" in schema else schema["enum"]
        names = {_type_of(v) for v in values}
    else:
        return None
    return {"number" if n == "integer" else n for n in names}


def _discriminated(members: list[Any]) -> bool:
    """Whether all members are objects with one required property whose const values differ between members."""
    if not all(isinstance(m, dict) and isinstance(m.get("properties"), dict) for m in members):
        return False
    required = [m.get("required") for m in members]
    if not members or not all(isinstance(r, list) and all(isinstance(n, str) for n in r) for r in required):
        return False
    common = set.intersection(*(set(r) for r in required))
    for name in common:
        props = [m["properties"].get(name) for m in members]
        consts = [p.get("const") if isinstance(p, dict) and "const" in p else None for p in props]
        if None not in consts and len({repr(c) for c in consts}) == len(consts):
            return True
    return False


def _resolve(schema: Any, root: Any) -> Any:
    """A local $ref's target (one level), or schema itself."""
    ref = schema.get("$ref") if isinstance(schema, dict) else None
    if not (isinstance(ref, str) and ref.startswith("#")):
        return schema
    node = root
    for part in ref[2:].split("/") if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return schema
    return node


def _type_of(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return next((n for n, t in JSON_TYPES.items() if isinstance(value, t)), "unknown")


def _is_type(value: Any, declared: Any) -> bool:
    names = declared if isinstance(declared, list) else [declared]
    t = _type_of(value)
    return t in names or (t == "integer" and "number" in names) or (
        t == "number" and "integer" in names and float(value).is_integer())


def _integer_only(declared: Any) -> bool:
    """Whether a type's numbers are all integers ("integer", or a list with it and without "number")."""
    names = declared if isinstance(declared, list) else [declared]
    return "integer" in names and "number" not in names


def _has(node: dict, keys: tuple[str, ...]) -> bool:
    return any(k in node for k in keys)


def _escape(name: str) -> str:
    """A property name as a JSON pointer token (RFC 6901)."""
    return str(name).replace("~", "~0").replace("/", "~1")
