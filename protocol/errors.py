"""Every JSON-RPC error this server can send, in one table, and the exceptions that carry them.

Exception tree (grouped by who must act)::

    RpcError(code, message, data=None)         .to_error() -> the JSON-RPC error object
    ├── the client must fix the request
    │   ├── ParseError               -32700  the frame is not JSON
    │   ├── InvalidRequest           -32600  not a JSON-RPC 2.0 request object
    │   ├── MethodNotFound           -32601
    │   ├── InvalidParams            -32602  data.errors: [{field, message}]
    │   ├── SessionNotFound          -32001  data.session_id
    │   ├── ContextLengthExceeded    -32002  data.prompt_tokens, data.limit
    │   └── UnsupportedToolSchema    -32003  data.tool, data.keyword
    ├── the client should retry later
    │   ├── Overloaded               -32000  data.retry_after_ms
    │   └── EngineUnavailable        -32004
    └── the operator must look
        └── InternalError            -32603

Code that meets an error raises the subclass; the server turns it into an error response (and,
for `generate`, a `stream_end` with finish_reason "error") at one place, the dispatcher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import ValidationError


@dataclass(frozen=True, slots=True)
class ErrorCode:
    """One row of the error table: what the code means and what its `data` object holds."""

    code: int
    name: str  # the exception class, and the key in the OpenRPC components/errors
    message: str  # the default `message`: short, stable, what clients may show
    who: Literal["client", "retry", "server"]  # who must act: fix the request, retry, operator
    meaning: str
    data: tuple[str, ...]  # members of `data` that are always present


# The one table. PROTOCOL.md, the OpenRPC document and the exception classes all read it.
ERROR_CODES: tuple[ErrorCode, ...] = (
    ErrorCode(-32700, "ParseError", "Parse error", "client",
              "The frame is not valid JSON (or holds NaN/Infinity or out-of-range numbers).", ("reason",)),
    ErrorCode(-32600, "InvalidRequest", "Invalid Request", "client",
              "The JSON is not a valid JSON-RPC 2.0 request: wrong `jsonrpc`, `method` not a string, "
              "`params` not an object/array, bad `id` type, empty or too long batch, nesting too deep, "
              "or a `generate` whose id is not a string or integer.", ("reason",)),
    ErrorCode(-32601, "MethodNotFound", "Method not found", "client",
              "No such method.", ("method",)),
    ErrorCode(-32602, "InvalidParams", "Invalid params", "client",
              "The params do not validate; each entry of `data.errors` names a field "
              "(dotted path inside params, \"\" for params itself) and says why.", ("errors",)),
    ErrorCode(-32603, "InternalError", "Internal error", "server",
              "A bug or an unexpected engine failure; the server logs it.", ()),
    ErrorCode(-32000, "Overloaded", "Server overloaded", "retry",
              "Too many requests queued or in flight; retry after `data.retry_after_ms`.", ("retry_after_ms",)),
    ErrorCode(-32001, "SessionNotFound", "Session not found", "client",
              "The session does not exist, expired, was closed, or belongs to another API key.", ("session_id",)),
    ErrorCode(-32002, "ContextLengthExceeded", "Context length exceeded", "client",
              "The prompt leaves no room in the model's context (prompt_tokens >= limit); a prompt "
              "that fits gets at most the tokens left and then ends with finish_reason 'length'.", ("prompt_tokens", "limit")),
    ErrorCode(-32003, "UnsupportedToolSchema", "Unsupported tool schema", "client",
              "A tool's `parameters` uses a JSON Schema keyword the constrained decoder cannot enforce.",
              ("tool", "keyword")),
    ErrorCode(-32004, "EngineUnavailable", "Engine unavailable", "retry",
              "The engine is loading, restarting or shutting down.", ()),
)
ERRORS_BY_CODE: dict[int, ErrorCode] = {e.code: e for e in ERROR_CODES}

PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL_ERROR = (
    -32700, -32600, -32601, -32602, -32603)
OVERLOADED, SESSION_NOT_FOUND, CONTEXT_LENGTH_EXCEEDED, UNSUPPORTED_TOOL_SCHEMA, ENGINE_UNAVAILABLE = (
    -32000, -32001, -32002, -32003, -32004)


class RpcError(Exception):
    """A JSON-RPC error: `code`, a one-sentence `message`, and an optional structured `data`."""

    CODE: ClassVar[int] = INTERNAL_ERROR  # overridden by each subclass

    def __init__(self, code: int, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_error(self) -> dict[str, Any]:
        """The JSON-RPC error object; `data` is left out when there is none."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error

    @staticmethod
    def from_error(error: dict[str, Any]) -> RpcError:
        """Rebuild the matching subclass from an error object (for clients and tests)."""
        code, message, data = error.get("code"), error.get("message", ""), error.get("data")
        cls = _CLASSES.get(code, RpcError) if isinstance(code, int) else RpcError
        exc = cls.__new__(cls)
        RpcError.__init__(exc, code if isinstance(code, int) else INTERNAL_ERROR, str(message), data)
        return exc

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code}, message={self.message!r}, data={self.data!r})"


class _TableError(RpcError):
    """A subclass whose code and default message come from ERROR_CODES."""

    def __init__(self, message: str | None = None, data: dict[str, Any] | None = None) -> None:
        super().__init__(self.CODE, message or ERRORS_BY_CODE[self.CODE].message, data)


class ParseError(_TableError):
    CODE = PARSE_ERROR


class InvalidRequest(_TableError):
    CODE = INVALID_REQUEST


class MethodNotFound(_TableError):
    CODE = METHOD_NOT_FOUND


class InvalidParams(_TableError):
    CODE = INVALID_PARAMS


class InternalError(_TableError):
    CODE = INTERNAL_ERROR


class EngineUnavailable(_TableError):
    CODE = ENGINE_UNAVAILABLE


class Overloaded(_TableError):
    CODE = OVERLOADED

    def __init__(self, retry_after_ms: int, message: str | None = None) -> None:
        super().__init__(message, {"retry_after_ms": int(retry_after_ms)})


class SessionNotFound(_TableError):
    CODE = SESSION_NOT_FOUND

    def __init__(self, session_id: str, message: str | None = None) -> None:
        super().__init__(message, {"session_id": session_id})


class ContextLengthExceeded(_TableError):
    CODE = CONTEXT_LENGTH_EXCEEDED

    def __init__(self, prompt_tokens: int, limit: int, message: str | None = None) -> None:
        super().__init__(message, {"prompt_tokens": int(prompt_tokens), "limit": int(limit)})


class UnsupportedToolSchema(_TableError):
    CODE = UNSUPPORTED_TOOL_SCHEMA

    def __init__(self, tool: str, keyword: str, message: str | None = None) -> None:
        super().__init__(message, {"tool": tool, "keyword": keyword})


_CLASSES: dict[int, type[RpcError]] = {
    cls.CODE: cls
    for cls in (ParseError, InvalidRequest, MethodNotFound, InvalidParams, InternalError,
                Overloaded, SessionNotFound, ContextLengthExceeded, UnsupportedToolSchema,
                EngineUnavailable)
}
# A row without a class (or a class without a row) is a bug in this module, found at import.
if set(_CLASSES) != set(ERRORS_BY_CODE) or any(_CLASSES[e.code].__name__ != e.name for e in ERROR_CODES):
    raise RuntimeError("protocol.errors: ERROR_CODES and the exception classes disagree")

MAX_REPORTED_ERRORS = 16  # a 10k-message history with one bad field each must not echo 10k lines


def invalid_params(exc: ValidationError) -> InvalidParams:
    """Translate a pydantic ValidationError raised on a params object into -32602.

    `data.errors` is a list of `{"field": "messages.0.role", "message": "..."}`: the field is the
    dotted path inside params ("" means params itself). At most MAX_REPORTED_ERRORS are listed;
    `data.truncated` counts the rest. The offending input values are not echoed back.
    """
    errors: list[dict[str, str]] = []
    for err in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(part) for part in err["loc"])
        message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        errors.append({"field": field, "message": message})
    data: dict[str, Any] = {"errors": errors[:MAX_REPORTED_ERRORS]}
    if len(errors) > MAX_REPORTED_ERRORS:
        data["truncated"] = len(errors) - MAX_REPORTED_ERRORS
    first = errors[0] if errors else {"field": "", "message": "invalid"}
    where = first["field"] or "params"
    return InvalidParams(f"Invalid params: {where}: {first['message']}", data)
