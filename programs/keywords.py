"""What the grammar backend can hold of a JSON Schema, and the checks that refuse the rest.

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

  Found by the official JSON-Schema-Test-Suite (draft 2020-12, tests/test_schema_suite.py runs
  it through check_tools and the arguments grammar; 0 invalid instances get through):

    patternProperties / propertyNames         no `type: object` in the subschema: any value passes
    patternProperties matching a property     only the `properties` subschema is applied
    propertyNames false / const / enum        ignored (pattern, min/maxLength, format are enforced);
                                                a declared property that violates it passes
    unevaluatedProperties/Items beside         the in-place applicators' annotations are not seen
      $ref/allOf/anyOf/oneOf/if/not, or inside
      one of them (or a $defs entry)
    `false` as a subschema of properties,     does not compile (allowed: additionalProperties,
      patternProperties, prefixItems, ...       items, unevaluated*)
    $ref into an array, with %-escapes or     not resolved; embedded $id (re-bases refs), $anchor
      empty tokens

  Over-constraints: valid values the grammar refuses (kept; each is measured by the suite run):
    - an object that declares `properties` is closed (undeclared keys are refused unless
      additionalProperties/patternProperties allow them) and an array with prefixItems takes no
      further items unless `items` allows them (xgrammar's strict mode; every tool is strict);
    - a subschema without `type` is held to the type its keywords suggest (`properties` makes it
      an object, `items` an array), so e.g. {"properties": {"a": {}}} refuses the number 12;
    - integers are written without a fraction: 1.0 is refused where an integer (or the const 1)
      is expected;
    - `pattern` is matched against the whole string (JSON Schema searches), e.g. "a" refuses "xax".
  A compile error of xgrammar is also reported with the keyword (and pointer) it names.

  Enforced (and accepted): type (incl. lists), enum, const, properties, required,
  additionalProperties, unevaluatedProperties, propertyNames, min/maxProperties, items,
  prefixItems, unevaluatedItems, min/maxItems, minimum/maximum/exclusive*, min/maxLength,
  pattern (matched as a whole-string match, a subset of JSON Schema's search semantics),
  patternProperties (same), anyOf, oneOf with disjoint branches, allOf with one subschema,
  local $ref/$defs/definitions (recursion included).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import lru_cache
from typing import Any, NoReturn

import jsonschema

from programs.disjoint import disjoint, json_type, types_of

__all__ = ["ToolSchemaError", "UNSUPPORTED_KEYWORDS", "SUPPORTED_FORMATS", "check_parameters"]


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
    # measured with the JSON-Schema-Test-Suite: on a subschema without `type` xgrammar lets any
    # value through (e.g. {"patternProperties": {"[0-9]+": {"type": "boolean"}}} takes {"a1": null})
    "patternProperties": frozenset({"object"}),
    "propertyNames": frozenset({"object"}),
}
_RANGE = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_LOOKAROUND = re.compile(r"\(\?(=|!|<=|<!)")
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}

_SINGLE = ("additionalProperties", "contains", "else", "if", "items", "not", "propertyNames", "then",
           "unevaluatedItems", "unevaluatedProperties", "additionalItems", "contentSchema")
_ARRAYS = ("allOf", "anyOf", "oneOf", "prefixItems")
_MAPS = ("$defs", "definitions", "dependentSchemas", "patternProperties", "properties")
# Children that apply to the same instance as their parent (or are reached by $ref).
_IN_PLACE_CHILDREN = frozenset({"allOf", "anyOf", "oneOf", "if", "then", "else", "not", "dependentSchemas",
                                "$defs", "definitions"})
# Keywords beside which unevaluatedProperties/unevaluatedItems would have to collect annotations.
_IN_PLACE_SIBLINGS = ("$ref", "allOf", "anyOf", "oneOf", "if", "then", "else", "not", "dependentSchemas")
# Where a `false` subschema is enforced by xgrammar (elsewhere it does not compile).
_FALSE_ALLOWED = frozenset({"additionalProperties", "items", "unevaluatedItems", "unevaluatedProperties"})
# The propertyNames keywords xgrammar enforces on a key (measured: const, enum, false are ignored).
_PROPERTY_NAMES_KEYWORDS = frozenset({"type", "pattern", "minLength", "maxLength", "format",
                                      "title", "description", "$comment", "examples", "default"})
# Every keyword name, to point a compile error of xgrammar at one (see _compile_error_keyword).
_KEYWORDS_IN_ERRORS = ("prefixItems", "propertyNames", "patternProperties", "additionalProperties",
                       "unevaluatedProperties", "unevaluatedItems", "properties", "items", "pattern",
                       "format", "enum", "const", "anyOf", "oneOf", "allOf", "required", "type")


def _children(schema: dict, pointer: str) -> Iterator[tuple[Any, str, str]]:
    """(subschema, its pointer, the keyword holding it) of every direct subschema, booleans included."""
    for kw in _SINGLE:
        if kw in schema:
            yield schema[kw], f"{pointer}/{kw}", kw
    for kw in _ARRAYS:
        children = schema.get(kw)
        if isinstance(children, list):
            for i, child in enumerate(children):
                yield child, f"{pointer}/{kw}/{i}", kw
    for kw in _MAPS:
        children = schema.get(kw)
        if isinstance(children, dict):
            for name, child in children.items():
                esc = str(name).replace("~", "~0").replace("/", "~1")
                yield child, f"{pointer}/{kw}/{esc}", kw


def _walk(schema: Any, pointer: str = "#", in_place: bool = False) -> Iterator[tuple[dict, str, bool]]:
    """Every object subschema with its JSON pointer and whether it is reached through an
    in-place applicator (allOf/anyOf/oneOf/if/then/else/not/dependentSchemas, or $defs, which
    only $ref reaches): the subschemas whose annotations unevaluated* would have to see."""
    if not isinstance(schema, dict):
        return
    yield schema, pointer, in_place
    for child, ptr, kw in _children(schema, pointer):
        if kw != "propertyNames":  # a schema of keys (strings), checked with its parent
            yield from _walk(child, ptr, in_place or kw in _IN_PLACE_CHILDREN)


@lru_cache(maxsize=1024)
def _xgrammar_compile_error(schema_json: str) -> str | None:
    import xgrammar

    try:
        xgrammar.Grammar.from_json_schema(schema_json, any_whitespace=False, separators=(",", ":"))
    except Exception as exc:  # xgrammar raises RuntimeError with its C++ message
        return str(exc).strip().splitlines()[-1]
    return None


def _check_subschema(name: str, sub: dict, pointer: str, in_place: bool = False) -> None:
    def refuse(keyword: str, reason: str, at: str | None = None) -> NoReturn:
        raise ToolSchemaError(name, reason, keyword=keyword, pointer=at or pointer)

    for kw in sorted(UNSUPPORTED_KEYWORDS.keys() & sub.keys()):
        refuse(kw, f"keyword {kw!r} cannot be enforced: {UNSUPPORTED_KEYWORDS[kw]}")

    if "$id" in sub and pointer != "#":
        refuse("$id", "an embedded $id changes the base of the references below it; xgrammar resolves every "
               "$ref against the document root")
    if "$anchor" in sub:
        refuse("$anchor", "xgrammar does not resolve $anchor references")

    for child, at, kw in _children(sub, pointer):
        if child is False and kw not in _FALSE_ALLOWED:
            refuse(kw, f"a `false` subschema under {kw!r} cannot be compiled by xgrammar", at)
        if child is True and kw == "prefixItems":
            refuse(kw, "a boolean subschema in prefixItems cannot be compiled by xgrammar", at)

    for kw in ("unevaluatedProperties", "unevaluatedItems"):
        if kw not in sub:
            continue
        beside = [k for k in _IN_PLACE_SIBLINGS if k in sub]
        if beside:
            refuse(kw, f"{kw} beside {beside[0]!r} cannot be enforced: xgrammar does not collect the annotations "
                   "of in-place applicators (only the same subschema's properties/items count)")
        if in_place:
            refuse(kw, f"{kw} inside an in-place applicator (allOf/anyOf/oneOf/if/not/$defs) cannot be enforced: "
                   "xgrammar does not evaluate it against the annotations of the enclosing schema")

    pattern_props = sub.get("patternProperties")
    props = sub.get("properties")
    if isinstance(pattern_props, dict):
        for pat, child in pattern_props.items():
            if child is True:
                continue
            for prop in props if isinstance(props, dict) else {}:
                try:
                    hit = re.search(pat, prop) is not None
                except re.error:
                    hit = True
                if hit:
                    refuse("patternProperties", f"pattern {pat!r} matches the declared property {prop!r}; xgrammar "
                           "applies only the `properties` subschema to it, JSON Schema both")

    names = sub.get("propertyNames")
    if "propertyNames" in sub:
        if not isinstance(names, dict) or not names.keys() <= _PROPERTY_NAMES_KEYWORDS:
            extra = sorted(names.keys() - _PROPERTY_NAMES_KEYWORDS) if isinstance(names, dict) else [repr(names)]
            refuse("propertyNames", f"propertyNames {', '.join(extra)} cannot be enforced: xgrammar holds keys only "
                   f"to {', '.join(sorted(_PROPERTY_NAMES_KEYWORDS - {'title', 'description', '$comment', 'examples', 'default'}))}")
        if names.get("type", "string") != "string":
            refuse("propertyNames", "propertyNames must describe strings (keys are strings)")
        _check_subschema(name, {**names, "type": "string"}, f"{pointer}/propertyNames")
        validator = jsonschema.Draft202012Validator(names, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
        for prop in props if isinstance(props, dict) else {}:
            if not validator.is_valid(prop):
                refuse("propertyNames", f"declared property {prop!r} does not satisfy propertyNames; xgrammar would "
                       "let it through")

    ref = sub.get("$ref")
    if isinstance(ref, str) and not (ref == "#" or ref.startswith("#/")):
        refuse("$ref", f"$ref {ref!r} cannot be enforced: xgrammar resolves only local refs ('#' or '#/...')")

    if isinstance(sub.get("allOf"), list) and len(sub["allOf"]) > 1:
        refuse("allOf", "keyword 'allOf' with more than one subschema cannot be enforced: xgrammar ignores it")

    branches = sub.get("oneOf")
    if isinstance(branches, list):
        for i in range(len(branches)):
            for j in range(i + 1, len(branches)):
                if not disjoint(branches[i], branches[j]):
                    refuse(
                        "oneOf",
                        f"oneOf branches {i} and {j} may overlap; xgrammar enforces oneOf only when the "
                        "branches are disjoint (different types, different const/enum values, or a "
                        "required discriminator property with different const values)",
                    )

    types = types_of(sub) if "type" in sub else None
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
                vt = json_type(v)
                if not (vt in types or (vt == "integer" and "number" in types)):
                    refuse(kw, f"{kw} value {v!r} is not of the declared type; xgrammar would let it through")


MAX_BRANCHES = 64  # default bound on the branches of one anyOf / oneOf / allOf


def _too_many_branches(value: Any, max_branches: int, pointer: str = "#") -> tuple[str, str, int] | None:
    """The first anyOf/oneOf/allOf with more than `max_branches` branches: (keyword, pointer, n).
    Linear in the schema's size: it runs before any check whose cost grows faster."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("anyOf", "oneOf", "allOf") and isinstance(item, list) and len(item) > max_branches:
                return key, f"{pointer}/{key}", len(item)
            found = _too_many_branches(item, max_branches, f"{pointer}/{key}")
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _too_many_branches(item, max_branches, f"{pointer}/{i}")
            if found:
                return found
    return None


def check_parameters(name: str, params: Any, *, max_branches: int = MAX_BRANCHES, object_root: bool = True) -> None:
    """Refuse `params` unless the grammar holds it (ToolSchemaError names the keyword and pointer).
    Bounded first: more than `max_branches` branches in one anyOf/oneOf/allOf is refused before
    the checks whose cost grows with the branches (oneOf disjointness compares every pair).
    object_root=False: the root may describe any JSON value (a response format's schema)."""
    too_many = _too_many_branches(params, max_branches)
    if too_many:
        keyword, pointer, n = too_many
        raise ToolSchemaError(name, f"{keyword} has {n} branches; at most {max_branches} are accepted "
                              "(limits.max_schema_branches)", pointer=pointer)
    try:
        jsonschema.Draft202012Validator.check_schema(params)
    except jsonschema.SchemaError as exc:
        pointer = "#" + "".join(f"/{p}" for p in exc.path)
        raise ToolSchemaError(name, f"not a valid JSON Schema (Draft 2020-12): {exc.message}", pointer=pointer) from None
    if not isinstance(params, dict) or (object_root and params.get("type") != "object"):
        raise ToolSchemaError(name, "parameters must be a JSON Schema with `type: object` (arguments are a JSON object)",
                              keyword="type")
    for sub, pointer, in_place in _walk(params):
        _check_subschema(name, sub, pointer, in_place)
        ref = sub.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/") and not _resolves(params, ref):
            raise ToolSchemaError(name, f"$ref {ref!r} cannot be resolved by xgrammar (it follows object keys only, "
                                  "without percent-decoding or empty tokens; array indexes are not followed)", keyword="$ref", pointer=pointer)
    err = _xgrammar_compile_error(json.dumps(params, sort_keys=True))
    if err:
        keyword, pointer = _compile_error_keyword(err)
        if pointer == "#":  # the message names no place: the first subschema that holds the keyword
            pointer = next((ptr for sub, ptr, _ in _walk(params) if keyword in sub), "#")
        raise ToolSchemaError(name, f"xgrammar cannot compile this schema: {err}", keyword=keyword, pointer=pointer)


def _resolves(document: Any, ref: str) -> bool:
    node = document
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not part or not isinstance(node, dict) or part not in node:  # xgrammar skips empty tokens
            return False
        node = node[part]
    return isinstance(node, dict) or node is True


def _compile_error_keyword(err: str) -> tuple[str, str]:
    """The keyword (and pointer, when the message has one) an xgrammar compile error is about."""
    m = re.search(r"Cannot find field .* in (#\S*)", err)
    if m:
        return "$ref", m.group(1)
    m = re.search(r"(#/\S*)", err)
    pointer = m.group(1) if m else "#"
    for kw in _KEYWORDS_IN_ERRORS:
        if kw in err:
            return kw, pointer
    return "$schema", pointer  # the schema as a whole
