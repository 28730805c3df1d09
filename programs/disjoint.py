"""JSON types of subschemas, and when two `oneOf` branches are disjoint (no value matches both):
only then does xgrammar's `oneOf` (which it treats as `anyOf`) hold exactly."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["disjoint", "json_type", "types_of"]


def types_of(schema: Any) -> frozenset[str] | None:
    """The JSON types a subschema can take, when it says so (type, const, enum); else None."""
    if not isinstance(schema, dict):
        return None
    t = schema.get("type")
    if isinstance(t, str):
        return frozenset({t})
    if isinstance(t, list):
        return frozenset(t)
    values = [schema["const"]] if "const" in schema else schema.get("enum")
    if isinstance(values, list):
        return frozenset(json_type(v) for v in values)
    return None


def json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "integer" if v.is_integer() else "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def _widen(types: frozenset[str]) -> frozenset[str]:
    # integer values are numbers too; for overlap checks integer and number are one family
    return types | {"number"} if "integer" in types else types


def _discriminators(branch: dict) -> dict[str, frozenset[str]]:
    """Required properties whose values are fixed (const/enum): name -> allowed values (as JSON)."""
    props = branch.get("properties") or {}
    required = set(branch.get("required") or [])
    out = {}
    for name, sub in props.items():
        if name not in required or not isinstance(sub, dict):
            continue
        values = [sub["const"]] if "const" in sub else sub.get("enum")
        if isinstance(values, list):
            out[name] = frozenset(json.dumps(v, sort_keys=True) for v in values)
    return out


def disjoint(a: Any, b: Any) -> bool:
    """True when no instance can match both subschemas, in ways xgrammar also proves."""
    ta, tb = types_of(a), types_of(b)
    if ta is not None and tb is not None and not (_widen(ta) & _widen(tb)):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        va = [a["const"]] if "const" in a else a.get("enum")
        vb = [b["const"]] if "const" in b else b.get("enum")
        if isinstance(va, list) and isinstance(vb, list):
            sa = {json.dumps(v, sort_keys=True) for v in va}
            sb = {json.dumps(v, sort_keys=True) for v in vb}
            if not (sa & sb):
                return True
        da, db = _discriminators(a), _discriminators(b)
        if any(not (da[k] & db[k]) for k in da.keys() & db.keys()):
            return True
    return False
