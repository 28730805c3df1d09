"""Response formats: the JSON value the text of a turn must be (OpenAI's `response_format`).

    {"type": "text"}                 free text (no response format)
    {"type": "json_object"}          any JSON object
    {"type": "json_schema", "json_schema": {"name", "schema", "strict"?, "description"?}}
                                     an instance of `schema` (any root type)

A schema is checked like a tool's `parameters` (programs.keywords.check_parameters: the same
keywords refused, the same bound on branches), except that its root may describe any JSON value.
Canonical form: keys sorted recursively (as tools are), so the grammar of equal schemas is
compiled once. The grammar (ToolProgram.structural_tag) is xgrammar's JSON-Schema conversion with
compact separators and no free whitespace, like tool arguments; `strict` changes nothing (the
text is always held to the schema). validate_response is the check after the turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jsonschema

from programs.keywords import MAX_BRANCHES, check_parameters

__all__ = ["COMPACT", "JSON_OBJECT", "ResponseFormat", "check_response_format", "validate_response"]

COMPACT = (",", ":")
JSON_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class ResponseFormat:
    """A turn's response format in canonical form. kind: 'json_object' | 'json_schema'; name:
    the json_schema's name (None for json_object); schema_json: the schema as canonical compact
    JSON (the grammar's and the validator's cache key)."""

    kind: str
    name: str | None
    schema_json: str

    @property
    def schema(self) -> Any:
        return json.loads(self.schema_json)

    @staticmethod
    def from_wire(response_format: dict[str, Any] | None) -> ResponseFormat | None:
        """The canonical form of a wire response_format (None for none or "text"); no schema
        checks here (check_response_format does them)."""
        if not response_format or response_format.get("type") in (None, "text"):
            return None
        kind = response_format["type"]
        if kind == "json_object":
            return ResponseFormat("json_object", None, _dumps(JSON_OBJECT))
        if kind != "json_schema":
            raise ValueError(f"response_format type must be 'text', 'json_object' or 'json_schema', not {kind!r}")
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ValueError('response_format json_schema needs {"name": ..., "schema": {...}}')
        return ResponseFormat("json_schema", str(spec.get("name") or ""), _dumps(spec["schema"]))


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=COMPACT)


def check_response_format(response_format: dict[str, Any] | None, *,
                          max_branches: int = MAX_BRANCHES) -> ResponseFormat | None:
    """The canonical response format, or ToolSchemaError (with `tool` = the schema's name) when
    its schema is not one the grammar holds: keyword None for an invalid JSON Schema or too many
    branches, else the keyword it cannot enforce. Compiling the grammar (into the cache the turn's
    constraint reads: programs.program.response_grammar) is the caller's next step, so a caller
    running both in a worker thread keeps that cost off its loop."""
    fmt = ResponseFormat.from_wire(response_format)
    if fmt is None:
        return None
    if fmt.kind == "json_schema":
        check_parameters(fmt.name or "", fmt.schema, max_branches=max_branches, object_root=False)
    return fmt


@lru_cache(maxsize=256)
def _validator(schema_json: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads(schema_json), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def validate_response(fmt: ResponseFormat, text: str) -> list[str]:
    """Why `text` is not a valid answer in `fmt` ([] = valid): not one JSON value, or jsonschema
    (Draft 2020-12) errors against the schema (json_object: {"type": "object"})."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        return [f"not one JSON value: {exc}"]
    errors = sorted(_validator(fmt.schema_json).iter_errors(value), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}" for e in errors]
