"""The OpenRPC 1.2.6 document that `rpc.discover` returns, generated from METHODS, NOTIFICATIONS,
the pydantic models' JSON Schemas and ERROR_CODES, so it cannot drift from the code.

Server-to-client notifications have no place in OpenRPC 1.2.6; they are listed under the
extension member "x-notifications" in the same shape as methods (without a result).
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .errors import ERROR_CODES, ERRORS_BY_CODE
from .jsonrpc import METHODS, NOTIFICATIONS
from .models import PROTOCOL_VERSION

OPENRPC_VERSION = "1.2.6"
_REF = "#/components/schemas/{model}"
Mode = Literal["validation", "serialization"]


def _params(model: type[BaseModel], schema: dict[str, Any]) -> list[dict[str, Any]]:
    """One OpenRPC content descriptor per field of a params model (by-name params)."""
    required = set(schema.get("required", ()))
    out = []
    for name, field_schema in schema.get("properties", {}).items():
        descriptor: dict[str, Any] = {"name": name, "required": name in required, "schema": field_schema}
        description = model.model_fields[name].description
        if description:
            descriptor["description"] = description
        out.append(descriptor)
    return out


@lru_cache(maxsize=1)
def _document() -> dict[str, Any]:
    # One schema pass over every model, so shared types (Tool, ToolCall, Usage...) are defined once.
    inputs: list[tuple[type[BaseModel], Mode]] = [(spec.params, "validation") for spec in METHODS.values()]
    outputs: list[tuple[type[BaseModel], Mode]] = [(spec.result, "serialization") for spec in METHODS.values()]
    outputs += [(model, "serialization") for model, _ in NOTIFICATIONS.values()]
    keyed, top = models_json_schema(inputs + outputs, ref_template=_REF)
    schemas: dict[str, Any] = top.get("$defs", {})

    def inline(model: type[BaseModel], mode: Mode) -> dict[str, Any]:
        schema = keyed[(model, mode)]
        if "$ref" in schema:  # params are listed field by field, so resolve the model itself
            schema = schemas[schema["$ref"].rsplit("/", 1)[-1]]
        return schema

    methods = []
    for name, spec in METHODS.items():
        methods.append({
            "name": name,
            "description": spec.description,
            "paramStructure": "by-name",
            "params": _params(spec.params, inline(spec.params, "validation")),
            "result": {"name": f"{name}.result", "schema": keyed[(spec.result, "serialization")]},
            "errors": [{"$ref": f"#/components/errors/{ERRORS_BY_CODE[c].name}"} for c in spec.errors],
        })
    notifications = [
        {
            "name": name,
            "description": description,
            "paramStructure": "by-name",
            "params": _params(model, inline(model, "serialization")),
        }
        for name, (model, description) in NOTIFICATIONS.items()
    ]
    errors = {
        e.name: {"code": e.code, "message": e.message, "x-meaning": e.meaning, "x-who-acts": e.who,
                 "x-data-members": list(e.data)}
        for e in ERROR_CODES
    }
    return {
        "openrpc": OPENRPC_VERSION,
        "info": {
            "title": "agent-runtime",
            "version": str(PROTOCOL_VERSION),
            "description": "JSON-RPC 2.0 over a WebSocket (ws://HOST:PORT/ws); see protocol/PROTOCOL.md.",
        },
        "methods": methods,
        "components": {"schemas": schemas, "errors": errors},
        "x-notifications": notifications,
    }


def openrpc_document() -> dict[str, Any]:
    """The OpenRPC document (a fresh copy: callers may mutate it, e.g. to add "servers")."""
    return copy.deepcopy(_document())


@lru_cache(maxsize=1)
def openrpc_json() -> str:
    """The OpenRPC document as compact JSON text, encoded once: what `rpc.discover` serves (as
    jsonrpc.RawJSON), so a flood of discover calls costs neither a copy nor an encoding each."""
    return json.dumps(_document(), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
