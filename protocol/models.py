"""Pydantic models of every message of wire contract v1 (see protocol/PROTOCOL.md).

Contracts:
- Params models (what clients send) are strict and `extra="forbid"`: an unknown field, a string
  where a number belongs, or a bool where an int belongs is -32602, never silently coerced.
- Every validation error is attached to a named field (no model-level validators), so
  `errors.invalid_params` can say which field and why. Cross-field rules are field validators
  that read fields declared earlier (`info.data`), which is why field order matters here.
- Result and notification models are what the server builds; they are lenient (extra fields
  ignored, lax types) so additive protocol changes do not break older readers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    RootModel,
    ValidationInfo,
    field_validator,
)

from .errors import InvalidParams
from .events import ErrorObject, FunctionCallRequest, ReasoningChunk, StreamEnd, TextChunk, Timings, Usage
from .fields import (
    EMPTY_PARAMETERS,
    MAX_STOP_SEQUENCES,
    PROTOCOL_VERSION,
    TOOL_NAME_PATTERN,
    FinishReason,
    RequestId,
    RequestLimits,
    Text,
    _fail,
    _limits,
    _one_error,
    _Params,
    _unicode_json,
    _unicode_text,
    _Wire,
)

# --------------------------------------------------------------------------- shared types

ToolName = Annotated[str, Field(pattern=TOOL_NAME_PATTERN, description="^[a-zA-Z0-9_-]{1,64}$")]
Id = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_unicode_text)]
Role = Literal["system", "user", "assistant", "tool"]


class FunctionDefinition(_Params):
    name: ToolName
    description: Text | None = None
    parameters: dict[str, Any] = Field(
        default_factory=lambda: dict(EMPTY_PARAMETERS),
        description="JSON Schema of the arguments object. Default: an object with no properties.",
    )
    strict: bool | None = Field(
        default=None, description="Accepted for OpenAI compatibility; calls are always constrained."
    )

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        # Arguments reach the client as a JSON object, so the schema must describe one.
        if "type" in value and value["type"] != "object":
            raise _fail('must describe a JSON object: "type" must be "object"')
        return _unicode_json(value)


class Tool(_Params):
    """The OpenAI function-tool shape."""

    type: Literal["function"] = "function"
    function: FunctionDefinition


def _unique_tool_names(tools: list[Tool] | None) -> list[Tool] | None:
    if tools is not None:
        seen: set[str] = set()
        for tool in tools:
            if tool.function.name in seen:
                raise _fail(f"tool names must be unique; {tool.function.name!r} appears twice")
            seen.add(tool.function.name)
    return tools


class ToolCall(_Params):
    """One tool call; `arguments` is already parsed and valid against the tool's `parameters`."""

    call_id: Id
    name: ToolName
    arguments: Annotated[dict[str, Any], AfterValidator(_unicode_json)]


class HistoryMessage(_Params):
    role: Role
    content: Text | None = Field(
        default=None, validate_default=True,
        description="Required for system, user and tool; may be null for an assistant that called tools.",
    )
    tool_calls: list[ToolCall] | None = Field(default=None, description="Only on assistant messages.")
    tool_call_id: Id | None = Field(
        default=None, validate_default=True, description="Required on tool messages, and only there."
    )

    @field_validator("content")
    @classmethod
    def _content(cls, value: str | None, info: ValidationInfo) -> str | None:
        role = info.data.get("role")
        if value is None and role in ("system", "user", "tool"):
            raise _fail(f"a {role} message needs string content")
        return value

    @field_validator("tool_calls")
    @classmethod
    def _tool_calls(cls, value: list[ToolCall] | None, info: ValidationInfo) -> list[ToolCall] | None:
        role = info.data.get("role")
        if value is not None and role is not None and role != "assistant":
            raise _fail("only assistant messages carry tool_calls")
        if value is not None and len({c.call_id for c in value}) != len(value):
            raise _fail("call_id values must be unique")
        return value

    @field_validator("tool_call_id")
    @classmethod
    def _tool_call_id(cls, value: str | None, info: ValidationInfo) -> str | None:
        role = info.data.get("role")
        if role == "tool" and value is None:
            raise _fail("a tool message needs the tool_call_id of the call it answers")
        if role not in (None, "tool") and value is not None:
            raise _fail("only tool messages carry tool_call_id")
        return value


class ToolChoiceName(_Params):
    name: ToolName


class ToolChoiceFunction(_Params):
    type: Literal["function"]
    function: ToolChoiceName


ToolChoice = Annotated[
    Literal["auto", "none", "required"] | ToolChoiceFunction,
    _one_error('"auto", "none", "required" or {"type": "function", "function": {"name": <tool name>}}'),
]


def check_tool_choice(tool_choice: str | ToolChoiceFunction, tools: Sequence[Tool | str] | None) -> None:
    """Raise InvalidParams (field `tool_choice`) unless `tool_choice` can be met with `tools`
    (Tool models or tool names).

    GenerateRequestParams runs this for stateless requests; with a session the runtime must call
    it with the session's tools, which the request does not carry.
    """
    message = _tool_choice_problem(tool_choice, tools)
    if message is not None:
        raise InvalidParams(f"Invalid params: tool_choice: {message}",
                            {"errors": [{"field": "tool_choice", "message": message}]})


def _tool_choice_problem(tool_choice: str | ToolChoiceFunction, tools: Sequence[Tool | str] | None) -> str | None:
    names = [t if isinstance(t, str) else t.function.name for t in tools or ()]
    if tool_choice == "required" and not names:
        return '"required" needs at least one tool'
    if isinstance(tool_choice, ToolChoiceFunction) and tool_choice.function.name not in names:
        return f"names {tool_choice.function.name!r}, which is not one of the tools"
    return None


class JsonSchemaFormat(_Params):
    """The schema of a json_schema response format (OpenAI's shape)."""

    name: ToolName
    description: Text | None = None
    schema_: Annotated[dict[str, Any], AfterValidator(_unicode_json)] = Field(
        alias="schema", description="A JSON Schema (any root type) the text of the turn is an instance of. "
        "Checked like a tool's parameters: a keyword the constrained decoder cannot enforce is -32003.")
    strict: bool | None = Field(
        default=None, description="Accepted for OpenAI compatibility; the text is always held to the schema.")


class ResponseFormat(_Params):
    """What the text of a turn is: free text, one JSON object, or one instance of a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(
        default=None, validate_default=True, description='Required with type "json_schema", and only there.')

    @field_validator("json_schema")
    @classmethod
    def _json_schema(cls, value: JsonSchemaFormat | None, info: ValidationInfo) -> JsonSchemaFormat | None:
        kind = info.data.get("type")
        if kind == "json_schema" and value is None:
            raise _fail('required with type "json_schema": {"name": ..., "schema": {...}}')
        if kind is not None and kind != "json_schema" and value is not None:
            raise _fail(f'only with type "json_schema", not {kind!r}')
        return value

    def wire(self) -> dict[str, Any]:
        """The JSON shape (the schema under its wire name "schema")."""
        return self.model_dump(by_alias=True, exclude_none=True)


# --------------------------------------------------------------------------- method params / results


class SessionOpenParams(_Params):
    system_prompt: Text | None = None
    tools: list[Tool] | None = None

    @field_validator("tools")
    @classmethod
    def _tools(cls, value: list[Tool] | None) -> list[Tool] | None:
        return _unique_tool_names(value)


class SessionOpenResult(_Wire):
    session_id: str
    prefix_tokens: int = Field(ge=0, description="Tokens of the rendered system prompt and tools.")


class GenerateRequestParams(_Params):
    """One assistant turn. Field order matters: later validators read earlier fields."""

    session_id: Id | None = None
    messages: list[HistoryMessage] = Field(
        min_length=1,
        description="With session_id: only this turn's new messages (user, or tool results for the "
        "last turn's calls). Without: the whole history.",
    )
    system_prompt: Text | None = Field(default=None, validate_default=True, description="Stateless only.")
    tools: list[Tool] | None = Field(default=None, validate_default=True, description="Stateless only.")
    tool_choice: ToolChoice = Field(default="auto", validate_default=True)
    parallel_tool_calls: bool = True
    max_tokens: int | None = Field(default=None, ge=1, description="Default and cap: see server.info limits.")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: list[Annotated[str, Field(min_length=1), AfterValidator(_unicode_text)]] | None = Field(
        default=None, description="At most limits.max_stop_sequences strings (default 16), each of at most "
        "limits.max_stop_chars characters (default 128).")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    response_format: ResponseFormat | None = Field(
        default=None, description='{"type": "text"} (the default), {"type": "json_object"} or {"type": "json_schema", '
        '"json_schema": {"name", "schema", "strict"?, "description"?}}: the text of the turn is one JSON value.')

    @field_validator("messages", mode="before")
    @classmethod
    def _message_count(cls, value: Any, info: ValidationInfo) -> Any:
        # Before the messages are validated one by one: a huge list is refused at its length.
        limit = _limits(info).max_messages
        if isinstance(value, list) and len(value) > limit:
            raise _fail(f"{len(value)} messages: at most {limit} in one request (limits.max_messages)")
        return value

    @field_validator("messages")
    @classmethod
    def _messages(cls, value: list[HistoryMessage], info: ValidationInfo) -> list[HistoryMessage]:
        if info.data.get("session_id") is not None:
            # The session already holds everything before this turn, append-only.
            for i, m in enumerate(value):
                if m.role not in ("user", "tool"):
                    raise _fail(f"with session_id, messages are only this turn's new user or tool "
                                f"messages; messages.{i} has role {m.role!r}")
            return value
        answered: set[str] = set()
        for i, m in enumerate(value):
            if m.role == "assistant" and m.tool_calls:
                answered.update(c.call_id for c in m.tool_calls)
            elif m.role == "tool" and m.tool_call_id not in answered:
                raise _fail(f"messages.{i}.tool_call_id {m.tool_call_id!r} answers no earlier "
                            f"assistant tool call")
        return value

    @field_validator("system_prompt")
    @classmethod
    def _system_prompt(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("session_id") is not None:
            raise _fail("comes from the session; do not send it with session_id")
        messages = info.data.get("messages") or []
        if value is not None and messages and messages[0].role == "system":
            raise _fail("give the system prompt once: as system_prompt or as a first system message")
        return value

    @field_validator("tools")
    @classmethod
    def _tools(cls, value: list[Tool] | None, info: ValidationInfo) -> list[Tool] | None:
        if value is not None and info.data.get("session_id") is not None:
            raise _fail("come from the session; do not send them with session_id")
        return _unique_tool_names(value)

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        # SGLang matches every stop string against the output's tail on every decode step, in
        # the scheduler all clients share: their number and length are bounded.
        if value is None:
            return value
        limits = _limits(info)
        if len(value) > limits.max_stop_sequences:
            raise _fail(f"{len(value)} stop sequences: at most {limits.max_stop_sequences} (limits.max_stop_sequences)")
        for i, s in enumerate(value):
            if len(s) > limits.max_stop_chars:
                raise _fail(f"stop.{i} has {len(s)} characters: at most {limits.max_stop_chars} (limits.max_stop_chars)")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, value: Any, info: ValidationInfo) -> Any:
        # With a session the tools live in the runtime, which calls check_tool_choice itself.
        if info.data.get("session_id") is None and "tools" in info.data:
            message = _tool_choice_problem(value, info.data["tools"])
            if message is not None:
                raise _fail(message)
        return value


class GenerateResult(_Wire):
    text: str
    tool_calls: list[ToolCall]
    # "error" is never a result: a failed generate is answered with a JSON-RPC error.
    finish_reason: Literal["stop", "length", "tool_calls", "cancelled"]
    usage: Usage
    timings: Timings


class CancelParams(_Params):
    request_id: RequestId


class CancelResult(_Wire):
    cancelled: bool = Field(description="False when no generate with that id is running on this connection.")


class SessionCloseParams(_Params):
    session_id: Id


class SessionCloseResult(_Wire):
    closed: Literal[True] = True


class EmptyParams(_Params):
    """Params of methods that take none: `{}`, `[]` or no params member."""


class ServerInfoResult(_Wire):
    protocol_version: Literal[1] = PROTOCOL_VERSION
    model: str
    backend: str
    context_length: int
    limits: dict[str, Any]


class DiscoverResult(RootModel[dict[str, Any]]):
    """An OpenRPC 1.2.6 document (see protocol.openrpc)."""


__all__ = [
    "PROTOCOL_VERSION", "TOOL_NAME_PATTERN", "MAX_STOP_SEQUENCES", "RequestLimits", "EMPTY_PARAMETERS",
    "RequestId", "FinishReason", "Role", "ToolChoice", "ResponseFormat", "JsonSchemaFormat",
    "FunctionDefinition", "Tool", "ToolCall", "HistoryMessage", "ToolChoiceName", "ToolChoiceFunction",
    "check_tool_choice",
    "SessionOpenParams", "SessionOpenResult", "GenerateRequestParams", "Usage", "Timings",
    "GenerateResult", "CancelParams", "CancelResult", "SessionCloseParams", "SessionCloseResult",
    "EmptyParams", "ServerInfoResult", "DiscoverResult",
    "TextChunk", "ReasoningChunk", "FunctionCallRequest", "ErrorObject", "StreamEnd",
]
