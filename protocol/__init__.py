"""The wire: JSON-RPC 2.0 envelope, method params/results, notifications and error codes.

Pure Python (pydantic only): no engine import, so clients and tests can use it alone.
Reference: protocol/PROTOCOL.md. Entry points for the server: `parse_frame`, `bind_params`,
`METHODS`, `NOTIFICATIONS`, the builders `response` / `error_response` / `notification` /
`encode`, and the `RpcError` tree.
"""

from .errors import (
    ERROR_CODES,
    ERRORS_BY_CODE,
    ContextLengthExceeded,
    EngineUnavailable,
    ErrorCode,
    InternalError,
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    Overloaded,
    ParseError,
    RpcError,
    SessionNotFound,
    UnsupportedToolSchema,
    invalid_params,
)
from .jsonrpc import (
    METHODS,
    NOTIFICATIONS,
    Call,
    Frame,
    MethodSpec,
    bind_params,
    encode,
    error_response,
    notification,
    parse_frame,
    response,
)
from .models import (
    PROTOCOL_VERSION,
    CancelParams,
    CancelResult,
    DiscoverResult,
    EmptyParams,
    ErrorObject,
    FunctionCallRequest,
    FunctionDefinition,
    GenerateRequestParams,
    GenerateResult,
    HistoryMessage,
    ReasoningChunk,
    ServerInfoResult,
    SessionCloseParams,
    SessionCloseResult,
    SessionOpenParams,
    SessionOpenResult,
    StreamEnd,
    TextChunk,
    Timings,
    Tool,
    ToolCall,
    ToolChoiceFunction,
    Usage,
    check_tool_choice,
)
from .openrpc import openrpc_document

__all__ = [
    # errors
    "ERROR_CODES", "ERRORS_BY_CODE", "ErrorCode", "RpcError", "ParseError", "InvalidRequest",
    "MethodNotFound", "InvalidParams", "InternalError", "Overloaded", "SessionNotFound",
    "ContextLengthExceeded", "UnsupportedToolSchema", "EngineUnavailable", "invalid_params",
    # envelope
    "METHODS", "NOTIFICATIONS", "MethodSpec", "Call", "Frame", "parse_frame", "bind_params",
    "response", "error_response", "notification", "encode", "openrpc_document",
    # models
    "PROTOCOL_VERSION", "Tool", "FunctionDefinition", "ToolCall", "HistoryMessage", "ToolChoiceFunction",
    "check_tool_choice", "Usage", "Timings", "ErrorObject",
    "SessionOpenParams", "SessionOpenResult", "GenerateRequestParams", "GenerateResult",
    "CancelParams", "CancelResult", "SessionCloseParams", "SessionCloseResult", "EmptyParams",
    "ServerInfoResult", "DiscoverResult", "TextChunk", "ReasoningChunk", "FunctionCallRequest", "StreamEnd",
]
