"""How OpenAI and vLLM read a request field's JSON before its type is checked, shared by the engine server's
strict schemas and the gateway's (no heavy imports: the gateway runs without torch)."""
from __future__ import annotations

import types
import typing
from typing import Annotated, Any


def as_openai_reads(fields: dict[str, Any], data: Any) -> Any:
    """`data` (a request object's JSON) with null dropped for each field of `fields` (pydantic's model_fields) whose
    type takes no None, so that it means the field's default (clients send `"n": null`), and a whole float (4.0)
    for an integer field made that integer. Anything else is left to the schema's own (strict) checks."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for name, info in fields.items():
        key = info.alias if info.alias in data else name
        if key not in data:
            continue
        kinds = _kinds(info)
        value = data[key]
        if value is None and type(None) not in kinds:
            del data[key]
        elif isinstance(value, float) and value.is_integer() and int in kinds and float not in kinds:
            data[key] = int(value)
    return data


_KINDS: dict[int, tuple[Any, set[Any]]] = {}  # id(field info) → (the field info, kept alive; its types)


def _kinds(info: Any) -> set[Any]:
    """_types_of(info.annotation), worked out once per field (per request it was ~8% of the gateway's CPU)."""
    hit = _KINDS.get(id(info))
    if hit is None or hit[0] is not info:
        hit = _KINDS[id(info)] = (info, _types_of(info.annotation))
    return hit[1]


def _types_of(annotation: Any) -> set[Any]:
    """The plain types a field annotation admits (through Optional, unions and Annotated)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _types_of(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_types_of(a) for a in typing.get_args(annotation)))
    return {origin or annotation}
