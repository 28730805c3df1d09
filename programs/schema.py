"""Tool schemas: validated once, refused when the grammar backend cannot hold them, made canonical.

A tool's `parameters` schema becomes a grammar (xgrammar's JSON-Schema converter) that every
generated call is held to. What the grammar can hold, and the keyword checks that refuse the
rest before any request reaches the engine: programs.keywords.

Canonical form: tools are sorted by name and every object's keys are sorted recursively, so
the same tool set gives the same bytes (and the same prompt tokens, and a shared prefix cache)
whatever order a client wrote them in. One consequence: a schema's `properties` are sorted
too, and xgrammar generates properties in schema order, so arguments come out in key order.
"""

from __future__ import annotations

import copy
import json
import re
from functools import lru_cache
from typing import Any

import jsonschema

from programs.keywords import _EMPTY_PARAMETERS, MAX_BRANCHES, UNSUPPORTED_KEYWORDS, ToolSchemaError, check_parameters

__all__ = ["ToolSchemaError", "check_tools", "canonical_tools", "validate_arguments", "UNSUPPORTED_KEYWORDS"]

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


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


def check_tools(tools: list[dict] | None, *, max_branches: int = MAX_BRANCHES) -> list[dict]:
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
            check_parameters(name, fn["parameters"], max_branches=max_branches)
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
