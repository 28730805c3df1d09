"""Tool schemas: validated once, refused when the grammar backend cannot hold them, made canonical.

A tool's `parameters` schema becomes a grammar (xgrammar's JSON-Schema converter) that every
generated call is held to. Two ways that promise can break, both refused here, before any
request reaches the engine:

- the schema is not a JSON Schema (checked against the Draft 2020-12 metaschema);
- it uses a keyword the converter accepts but does not enforce, or cannot compile. The table
  below was measured on xgrammar 0.2.7 by compiling a schema per keyword and feeding the
  matcher an instance that violates it (tests/test_programs.py repeats the measurement, so a
  new xgrammar that starts or stops enforcing something shows up as a failing test):

    keyword                                   xgrammar 0.2.7
    not, if/then/else                         ignored
    contains, minContains, maxContains        ignored
    uniqueItems                               ignored
    dependentRequired, dependentSchemas       ignored (also the legacy `dependencies`)
    allOf with more than one subschema        ignored ("support ... still ongoing")
    oneOf with overlapping branches           weakened to anyOf (only disjoint branches are exact)
    multipleOf on numbers / with a range      ignored (enforced only on a bare integer)
    $ref other than "#" or "#/..."            not resolved ($anchor, URLs); $dynamicRef family too
    pattern with lookaround                   lookaround ignored; backreferences do not compile
    format other than the ones listed below   ignored
    format, pattern, min/maxLength together   only one of them holds
    required names not in `properties`        ignored (and {} is generated)
    numeric/string/array/object keywords      ignored when the subschema has no `type` that
      without a `type`                          they apply to (e.g. {"minimum": 3})
    enum/const values outside the `type`      let through although `type` forbids them

  Enforced (and accepted): type (incl. lists), enum, const, properties, required,
  additionalProperties, unevaluatedProperties, propertyNames, min/maxProperties, items,
  prefixItems, unevaluatedItems, min/maxItems, minimum/maximum/exclusive*, min/maxLength,
  pattern (matched as a whole-string match, a subset of JSON Schema's search semantics),
  patternProperties (same), anyOf, oneOf with disjoint branches, allOf with one subschema,
  local $ref/$defs/definitions (recursion included).

Canonical form: tools are sorted by name and every object's keys are sorted recursively, so
the same tool set gives the same bytes (and the same prompt tokens, and a shared prefix cache)
whatever order a client wrote them in. One consequence: a schema's `properties` are sorted
too, and xgrammar generates properties in schema order, so arguments come out in key order.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import jsonschema

__all__ = ["ToolSchemaError", "check_tools", "canonical_tools", "validate_arguments", "UNSUPPORTED_KEYWORDS"]


class ToolSchemaError(ValueError):
    """A tool is unusable. `keyword` is None when the schema is not a valid JSON Schema (or the
    tool is malformed); otherwise the JSON Schema keyword the grammar backend cannot enforce."""

    def __init__(self, tool: str | None, reason: str, *, keyword: str | None = None, pointer: str = "#"):
        self.tool = tool
        self.reason = reason
        self.keyword = keyword
        self.pointer = pointer
        where = f" at {pointer}" if pointer != "#" else ""
        super().__init__(f"tool {tool!r}{where}: {reason}")


# Accepted by xgrammar 0.2.7 without being enforced (see the module docstring).
UNSUPPORTED_KEYWORDS: dict[str, str] = {
    "not": "xgrammar ignores `not`",
    "if": "xgrammar ignores if/then/else",
    "then": "xgrammar ignores if/then/else",
    "else": "xgrammar ignores if/then/else",
    "contains": "xgrammar ignores `contains`",
    "minContains": "xgrammar ignores `minContains`",
    "maxContains": "xgrammar ignores `maxContains`",
    "uniqueItems": "xgrammar ignores `uniqueItems`",
    "dependentRequired": "xgrammar ignores `dependentRequired`",
    "dependentSchemas": "xgrammar ignores `dependentSchemas`",
    "dependencies": "xgrammar ignores `dependencies`",
    "$dynamicRef": "xgrammar does not resolve dynamic references",
    "$dynamicAnchor": "xgrammar does not resolve dynamic references",
    "$recursiveRef": "xgrammar does not resolve recursive references",
    "$recursiveAnchor": "xgrammar does not resolve recursive references",
}

# String formats xgrammar 0.2.7 implements (the same list SGLang checks for its json_schema path).
SUPPORTED_FORMATS = frozenset(
    {
        "date", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "json-pointer",
        "relative-json-pointer", "time", "uri", "uri-reference", "uri-template", "uuid",
    }
)

# Keywords that xgrammar only applies when the subschema's `type` says which kind of value it is.
_TYPED_KEYWORDS: dict[str, frozenset[str]] = {
    "minimum": frozenset({"integer", "number"}),
    "maximum": frozenset({"integer", "number"}),
    "exclusiveMinimum": frozenset({"integer", "number"}),
    "exclusiveMaximum": frozenset({"integer", "number"}),
    "multipleOf": frozenset({"integer", "number"}),
    "minLength": frozenset({"string"}),
    "maxLength": frozenset({"string"}),
    "pattern": frozenset({"string"}),
    "format": frozenset({"string"}),
    "minItems": frozenset({"array"}),
    "maxItems": frozenset({"array"}),
    "minProperties": frozenset({"object"}),
    "maxProperties": frozenset({"object"}),
}
_RANGE = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_LOOKAROUND = re.compile(r"\(\?(=|!|<=|<!)")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}

_SINGLE = ("additionalProperties", "contains", "else", "if", "items", "not", "propertyNames", "then",
           "unevaluatedItems", "unevaluatedProperties", "additionalItems", "contentSchema")
_ARRAYS = ("allOf", "anyOf", "oneOf", "prefixItems")
_MAPS = ("$defs", "definitions", "dependentSchemas", "patternProperties", "properties")


# --------------------------------------------------------------------------- canonical form
def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def _canonical_tool(tool: dict) -> dict:
    fn = tool["function"]
    out: dict[str, Any] = {"name": fn["name"]}
    if fn.get("description") is not None:
        out["description"] = fn["description"]
    params = fn.get("parameters")
    out["parameters"] = _sorted(params) if params is not None else copy.deepcopy(_EMPTY_PARAMETERS)
    return {"function": _sorted(out), "type": "function"}


def canonical_tools(tools: list[dict] | None) -> list[dict]:
    """The tools in canonical form: sorted by name, keys sorted recursively, only the fields
    that reach the prompt (type, function.name/description/parameters; `strict` is dropped:
    every tool is strict here). Deterministic: equal tool sets give equal JSON bytes."""
    return sorted((_canonical_tool(t) for t in tools or []), key=lambda t: t["function"]["name"])


def tools_json(tools: list[dict]) -> str:
    """Canonical tools as compact JSON (the bytes a prompt or a cache key is built from)."""
    return json.dumps(canonical_tools(tools), ensure_ascii=False, separators=(",", ":"))


# --------------------------------------------------------------------------- validation
def _walk(schema: Any, pointer: str = "#") -> Iterator[tuple[dict, str]]:
    if not isinstance(schema, dict):
        return
    yield schema, pointer
    for kw in _SINGLE:
        child = schema.get(kw)
        if isinstance(child, dict):
            yield from _walk(child, f"{pointer}/{kw}")
    for kw in _ARRAYS:
        children = schema.get(kw)
        if isinstance(children, list):
            for i, child in enumerate(children):
                yield from _walk(child, f"{pointer}/{kw}/{i}")
    for kw in _MAPS:
        children = schema.get(kw)
        if isinstance(children, dict):
            for name, child in children.items():
                esc = str(name).replace("~", "~0").replace("/", "~1")
                yield from _walk(child, f"{pointer}/{kw}/{esc}")


def _types(schema: Any) -> frozenset[str] | None:
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
        return frozenset(_json_type(v) for v in values)
    return None


def _json_type(v: Any) -> str:
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


def _disjoint(a: Any, b: Any) -> bool:
    """True when no instance can match both subschemas, in ways xgrammar also proves."""
    ta, tb = _types(a), _types(b)
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


@lru_cache(maxsize=1024)
def _xgrammar_compile_error(schema_json: str) -> str | None:
    import xgrammar

    try:
        xgrammar.Grammar.from_json_schema(schema_json, any_whitespace=False, separators=(",", ":"))
    except Exception as exc:  # xgrammar raises RuntimeError with its C++ message
        return str(exc).strip().splitlines()[-1]
    return None


def _check_subschema(name: str, sub: dict, pointer: str) -> None:
    def refuse(keyword: str, reason: str) -> None:
        raise ToolSchemaError(name, reason, keyword=keyword, pointer=pointer)

    for kw in sorted(UNSUPPORTED_KEYWORDS.keys() & sub.keys()):
        refuse(kw, f"keyword {kw!r} cannot be enforced: {UNSUPPORTED_KEYWORDS[kw]}")

    ref = sub.get("$ref")
    if isinstance(ref, str) and not (ref == "#" or ref.startswith("#/")):
        refuse("$ref", f"$ref {ref!r} cannot be enforced: xgrammar resolves only local refs ('#' or '#/...')")

    if isinstance(sub.get("allOf"), list) and len(sub["allOf"]) > 1:
        refuse("allOf", "keyword 'allOf' with more than one subschema cannot be enforced: xgrammar ignores it")

    branches = sub.get("oneOf")
    if isinstance(branches, list):
        for i in range(len(branches)):
            for j in range(i + 1, len(branches)):
                if not _disjoint(branches[i], branches[j]):
                    refuse(
                        "oneOf",
                        f"oneOf branches {i} and {j} may overlap; xgrammar enforces oneOf only when the "
                        "branches are disjoint (different types, different const/enum values, or a "
                        "required discriminator property with different const values)",
                    )

    types = _types(sub) if "type" in sub else None
    for kw, applies_to in _TYPED_KEYWORDS.items():
        if kw in sub and (types is None or not (types & applies_to)):
            refuse(kw, f"keyword {kw!r} needs an explicit `type` ({'/'.join(sorted(applies_to))}) to be enforced")
    required = sub.get("required")
    if isinstance(required, list):
        props = sub.get("properties")
        declared: dict[str, Any] = props if isinstance(props, dict) else {}
        missing = [r for r in required if r not in declared]
        if missing:
            refuse("required", f"required property {missing[0]!r} is not declared in `properties` of the same "
                   "subschema; xgrammar enforces only required names it finds there")

    if "multipleOf" in sub:
        m = sub["multipleOf"]
        if types != frozenset({"integer"}) or any(k in sub for k in _RANGE) or not float(m).is_integer():
            refuse("multipleOf", "xgrammar enforces multipleOf only with `type: integer`, an integral "
                   "divisor and no minimum/maximum in the same subschema")

    if types is not None and types <= {"integer"}:
        for kw in _RANGE:
            if kw in sub and isinstance(sub[kw], (int, float)) and not float(sub[kw]).is_integer():
                refuse(kw, f"{kw} of an integer must be a whole number for xgrammar")

    if types is not None and "string" in types:
        groups = [g for g, present in (("format", "format" in sub), ("pattern", "pattern" in sub),
                                       ("minLength", "minLength" in sub or "maxLength" in sub)) if present]
        if len(groups) > 1:
            refuse(groups[1], f"{' and '.join(groups)} on one string cannot be enforced together by xgrammar")
    fmt = sub.get("format")
    if fmt is not None and fmt not in SUPPORTED_FORMATS:
        refuse("format", f"string format {fmt!r} is not implemented by xgrammar "
               f"(supported: {', '.join(sorted(SUPPORTED_FORMATS))})")

    patterns = [("pattern", sub["pattern"])] if isinstance(sub.get("pattern"), str) else []
    patterns += [("patternProperties", p) for p in (sub.get("patternProperties") or {})]
    for kw, pattern in patterns:
        if _LOOKAROUND.search(pattern):
            refuse(kw, f"regex {pattern!r}: xgrammar ignores lookahead/lookbehind")
        err = _xgrammar_compile_error(json.dumps({"type": "string", "pattern": pattern}))
        if err:
            refuse(kw, f"regex {pattern!r} cannot be compiled by xgrammar: {err}")

    if types is not None:
        for kw in ("enum", "const"):
            if kw not in sub:
                continue
            values = [sub["const"]] if kw == "const" else sub["enum"]
            for v in values if isinstance(values, list) else []:
                vt = _json_type(v)
                if not (vt in types or (vt == "integer" and "number" in types)):
                    refuse(kw, f"{kw} value {v!r} is not of the declared type; xgrammar would let it through")


def _check_parameters(name: str, params: Any) -> None:
    try:
        jsonschema.Draft202012Validator.check_schema(params)
    except jsonschema.SchemaError as exc:
        pointer = "#" + "".join(f"/{p}" for p in exc.path)
        raise ToolSchemaError(name, f"not a valid JSON Schema (Draft 2020-12): {exc.message}", pointer=pointer) from None
    if not isinstance(params, dict) or params.get("type") != "object":
        raise ToolSchemaError(name, "parameters must be a JSON Schema with `type: object` (arguments are a JSON object)",
                              keyword="type")
    for sub, pointer in _walk(params):
        _check_subschema(name, sub, pointer)
    err = _xgrammar_compile_error(json.dumps(params, sort_keys=True))
    if err:
        raise ToolSchemaError(name, f"xgrammar cannot compile this schema: {err}")


def check_tools(tools: list[dict] | None) -> list[dict]:
    """Validate tools in the OpenAI shape and return them in canonical form (see canonical_tools).

    Raises ToolSchemaError: malformed tool, duplicate name, invalid JSON Schema (keyword None),
    or a keyword the grammar backend cannot enforce (keyword set).
    """
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ToolSchemaError(None, "tools must be a list")
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise ToolSchemaError(name if isinstance(name, str) else None,
                                  f'tools[{i}] must be {{"type": "function", "function": {{...}}}}')
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolSchemaError(name if isinstance(name, str) else None,
                                  f"tools[{i}].function.name must match ^[A-Za-z0-9_-]{{1,64}}$")
        if name in seen:
            raise ToolSchemaError(name, "duplicate tool name")
        seen.add(name)
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise ToolSchemaError(name, "function.description must be a string")
        if fn.get("parameters") is not None:
            _check_parameters(name, fn["parameters"])
    return canonical_tools(tools)


def _parameters(tool: dict) -> dict:
    fn = tool.get("function", tool)
    params = fn.get("parameters")
    return params if params is not None else _EMPTY_PARAMETERS


@lru_cache(maxsize=256)
def _validator(params_json: str) -> jsonschema.Draft202012Validator:
    # format is asserted: xgrammar enforces the formats it implements, so the check agrees.
    return jsonschema.Draft202012Validator(json.loads(params_json), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def validate_arguments(tool: dict, arguments: Any) -> list[str]:
    """jsonschema (Draft 2020-12) errors of `arguments` against the tool's parameters; [] = valid.
    `tool` is the OpenAI shape or its `function` object."""
    validator = _validator(json.dumps(_parameters(tool), sort_keys=True))
    errors = sorted(validator.iter_errors(arguments), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}" for e in errors]
