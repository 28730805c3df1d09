"""The server's notifications of a generate and the usage and timings they carry.

Server-built models: lenient on read (extra fields ignored), so additive protocol changes do not
break older readers. Re-exported by protocol.models.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, SerializerFunctionWrapHandler, ValidationInfo, field_validator, model_serializer

from .errors import RpcError
from .fields import FinishReason, RequestId, _fail, _Wire


class Usage(_Wire):
    prompt_tokens: int = Field(ge=0)
    cached_tokens: int = Field(ge=0, description="Prompt tokens the prefix cache served; 0 included.")
    completion_tokens: int = Field(ge=0)


class Timings(_Wire):
    ttft_ms: float | None = Field(ge=0.0, description="Time to first token; null when none was produced.")
    total_ms: float = Field(ge=0.0)


class TextChunk(_Wire):
    request_id: RequestId
    text: str


class ReasoningChunk(_Wire):
    request_id: RequestId
    text: str


class FunctionCallRequest(_Wire):
    request_id: RequestId
    call_id: str
    name: str
    arguments: dict[str, Any]


def _omit_if_none(key: str, data: dict[str, Any]) -> dict[str, Any]:
    if data.get(key) is None:
        data.pop(key, None)
    return data


class ErrorObject(_Wire):
    """The JSON-RPC error object, as carried by stream_end; `data` is omitted when absent."""

    code: int
    message: str
    data: Any = None

    # Serializers below are left without a return annotation on purpose: pydantic would take an
    # annotation as the serialized schema and the OpenRPC document would lose the fields.
    @model_serializer(mode="wrap")
    def _omit_absent_data(self, handler: SerializerFunctionWrapHandler):
        return _omit_if_none("data", handler(self))


class StreamEnd(_Wire):
    """The last notification of a generate; `error` is present exactly when finish_reason is "error"."""

    request_id: RequestId
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    error: ErrorObject | None = Field(default=None, validate_default=True)

    @field_validator("error")
    @classmethod
    def _error_iff_error(cls, value: ErrorObject | None, info: ValidationInfo) -> ErrorObject | None:
        reason = info.data.get("finish_reason")
        if reason is not None and (value is not None) != (reason == "error"):
            raise _fail('present exactly when finish_reason is "error"')
        return value

    @model_serializer(mode="wrap")
    def _omit_absent_error(self, handler: SerializerFunctionWrapHandler):
        return _omit_if_none("error", handler(self))

    @classmethod
    def for_error(cls, request_id: str | int, error: RpcError, *, total_ms: float,
                  usage: Usage | None = None, ttft_ms: float | None = None) -> StreamEnd:
        """The stream_end that precedes the JSON-RPC error response of a failed generate."""
        return cls(
            request_id=request_id, finish_reason="error",
            usage=usage or Usage(prompt_tokens=0, cached_tokens=0, completion_tokens=0),
            timings=Timings(ttft_ms=ttft_ms, total_ms=total_ms),
            error=ErrorObject(**error.to_error()),
        )
