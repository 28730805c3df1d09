"""Field types and validation helpers shared by the wire models (protocol.models): the
protocol's constants, the configurable request limits, text that must be valid Unicode, and
errors attached to one field."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, ValidationInfo, WrapValidator
from pydantic_core import PydanticCustomError

PROTOCOL_VERSION: Literal[1] = 1
TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
MAX_STOP_SEQUENCES = 16


@dataclass(frozen=True)
class RequestLimits:
    """The server's configurable request limits (INFERENCE_MAX_*), given to validation as the
    context {"limits": RequestLimits}; without one, these defaults apply."""

    max_messages: int = 1024
    max_stop_sequences: int = MAX_STOP_SEQUENCES
    max_stop_chars: int = 128


def _limits(info: ValidationInfo) -> RequestLimits:
    context = info.context
    limits = context.get("limits") if isinstance(context, dict) else None
    return limits if isinstance(limits, RequestLimits) else RequestLimits()


EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def _fail(message: str) -> PydanticCustomError:
    # A custom error keeps the message as written (a ValueError would be prefixed "Value error, ").
    return PydanticCustomError("invalid", message)


def _one_error(expected: str) -> WrapValidator:
    """Collapse a union's per-member errors into one error that names the field.

    Without it pydantic reports each member separately under locations such as
    `request_id.str` and `request_id.int`, which are not fields a client can find.
    """

    def validate(value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise _fail(f"must be {expected}") from None

    return WrapValidator(validate)


_SURROGATE = re.compile("[\ud800-\udfff]")
_NOT_UNICODE = ("contains a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair), "
                "which is not Unicode text")


def _unicode_text(value: str) -> str:
    """Refuse a lone surrogate: JSON can carry one (`"\\ud800"`), Unicode text cannot, and the
    tokenizer would fail on it deep inside the runtime."""
    bad = _SURROGATE.search(value)
    if bad is not None:
        raise _fail(f"{_NOT_UNICODE} (character {bad.start()})")
    return value


def _unicode_json(value: Any) -> Any:
    """The same for every string (keys included) inside a JSON value; the error names the path."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            bad = _SURROGATE.search(v)
        elif isinstance(v, dict):
            bad = None
            for k, item in v.items():
                if isinstance(k, str) and _SURROGATE.search(k):
                    raise _fail(f"the key {path + '.' if path else ''}{k.encode('utf-8', 'backslashreplace').decode()} {_NOT_UNICODE}")
                stack.append((f"{path}.{k}" if path else str(k), item))
            continue
        elif isinstance(v, list):
            stack.extend((f"{path}.{i}" if path else str(i), item) for i, item in enumerate(v))
            continue
        else:
            continue
        if bad is not None:
            where = f" (at {path})" if path else ""
            raise _fail(f"{_NOT_UNICODE}{where}")
    return value


Text = Annotated[str, AfterValidator(_unicode_text)]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


RequestId = Annotated[str | int, _one_error("a string or an integer (the generate's JSON-RPC id)")]
FinishReason = Literal["stop", "length", "tool_calls", "cancelled", "error"]
