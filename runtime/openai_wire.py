"""The OpenAI chat-completions wire: the request model, its translation into a generate, and
the error shape.

The request model is lenient where OpenAI is (unknown fields are ignored) and strict on types
(a string where a number belongs is a 400, never coerced). The translation builds
protocol.models.GenerateRequestParams, so every rule of /ws (tool names and schemas, limits,
tool_choice against the tools, tool results answering earlier calls) applies unchanged; its
errors are reported with OpenAI's field names where they differ.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol import errors as rpc
from protocol.fields import RequestLimits, _one_error
from protocol.models import GenerateRequestParams

PART_SEPARATOR = "\n"  # text parts of one message are joined with this (as vLLM does)


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Req):
    type: Literal["text"]
    text: str


Content = Annotated[str | list[TextPart] | None,
                   _one_error('a string or a list of text parts ({"type": "text", "text": ...}); other parts are not supported')]


class FunctionCall(_Req):
    name: str
    arguments: str


class MessageToolCall(_Req):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Req):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None


class StreamOptions(_Req):
    include_usage: bool = False


class JsonSchemaSpec(_Req):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Req):
    """text, json_object or json_schema; checked (name, schema, keywords) as the generate's
    response_format (protocol.models.ResponseFormat)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class ChatCompletionRequest(_Req):
    """POST /v1/chat/completions. Accepted and ignored: frequency_penalty, presence_penalty,
    user, metadata, store, logit_bias (and any field this model does not name)."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Annotated[str | dict[str, Any] | None, _one_error('"auto", "none", "required" or a named function')] = None
    parallel_tool_calls: bool | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: Annotated[str | list[str] | None, _one_error("a string or a list of strings")] = None
    seed: int | None = None
    n: Literal[1] | None = None  # several choices: not supported
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    logprobs: Literal[False] | None = None  # not supported
    frequency_penalty: float | None = None
    presence_penalty: float | None = None


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def from_rpc(exc: rpc.RpcError, *, offset: int = 0) -> OpenAIError:
    """The OpenAI error for a JSON-RPC error; `offset` is the number of leading system messages
    taken out of `messages`, added back to the indexes the error names."""
    data = exc.data or {}
    if exc.code == rpc.INVALID_PARAMS:
        errors = data.get("errors") or [{}]
        field = _openai_field(str(errors[0].get("field") or ""), offset)
        message = exc.message.removeprefix("Invalid params: ")
        return bad_request(_openai_message(message, offset), param=field or None, code="invalid_value")
    if exc.code == rpc.CONTEXT_LENGTH_EXCEEDED:
        limit, tokens = data.get("limit"), data.get("prompt_tokens")
        return bad_request(f"This model's maximum context length is {limit} tokens. However, your messages resulted in "
                           f"at least {tokens} tokens. ({exc.message})", param="messages", code="context_length_exceeded")
    if exc.code == rpc.UNSUPPORTED_TOOL_SCHEMA:
        if data.get("field") == "response_format":
            return bad_request(f"{exc.message} (keyword {data.get('keyword')!r})", param="response_format",
                               code="unsupported_tool_schema")
        return bad_request(f"{exc.message} (tool {data.get('tool')!r}, keyword {data.get('keyword')!r})",
                           param="tools", code="unsupported_tool_schema")
    if exc.code == rpc.SESSION_NOT_FOUND:
        return OpenAIError(404, exc.message, code="session_not_found")
    if exc.code == rpc.OVERLOADED:
        ms = int(data.get("retry_after_ms", 1000))
        return OpenAIError(429, exc.message, type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"retry-after-ms": str(ms), "retry-after": str(max(1, math.ceil(ms / 1000)))})
    if exc.code == rpc.ENGINE_UNAVAILABLE:
        return OpenAIError(503, exc.message, type="service_unavailable_error", code="engine_unavailable",
                           headers={"retry-after-ms": "1000", "retry-after": "1"})
    return OpenAIError(500, exc.message, type="server_error", code="internal_error")


_MESSAGE_INDEX = re.compile(r"\bmessages\.(\d+)")
_CALL_FIELD = re.compile(r"^(messages\.\d+\.tool_calls\.\d+)\.(call_id|name|arguments)\b")
_CALL_RENAMES = {"call_id": "id", "name": "function.name", "arguments": "function.arguments"}


def _openai_field(field: str, offset: int) -> str:
    """A GenerateRequestParams field as the OpenAI request names it."""
    field = _MESSAGE_INDEX.sub(lambda m: f"messages.{int(m.group(1)) + offset}", field)
    field = _CALL_FIELD.sub(lambda m: f"{m.group(1)}.{_CALL_RENAMES[m.group(2)]}", field)
    return "messages" if field == "system_prompt" else field


def _openai_message(message: str, offset: int) -> str:
    return _MESSAGE_INDEX.sub(lambda m: f"messages.{int(m.group(1)) + offset}", message) if offset else message


def json_object(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object; 400 for bad JSON (NaN and Infinity included) or another value."""
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    return data


def parse_request(body: bytes) -> ChatCompletionRequest:
    """The request model from a body; 400 (naming the field) for bad JSON or a wrong type."""
    data = json_object(body)
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        field = ".".join(str(p) for p in err["loc"])
        raise bad_request(f"{field}: {err['msg']}" if field else err["msg"], param=field or None) from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _text(content: Content) -> str | None:
    if content is None or isinstance(content, str):
        return content
    return PART_SEPARATOR.join(p.text for p in content)


def to_generate(req: ChatCompletionRequest, limits: RequestLimits) -> tuple[GenerateRequestParams, int]:
    """The stateless generate for a chat request, and how many leading system messages became
    its system_prompt (to report errors at OpenAI's indexes)."""
    leading = 0
    system: list[str] = []
    while leading < len(req.messages) and req.messages[leading].role in ("system", "developer"):
        system.append(_text(req.messages[leading].content) or "")
        leading += 1
    messages = [_history(m, leading + i) for i, m in enumerate(req.messages[leading:])]
    params: dict[str, Any] = {"messages": messages, "system_prompt": "\n\n".join(system) if system else None,
                              "tools": req.tools}
    if req.tool_choice is not None:
        params["tool_choice"] = req.tool_choice
    if req.parallel_tool_calls is not None:
        params["parallel_tool_calls"] = req.parallel_tool_calls
    if req.response_format is not None:
        params["response_format"] = req.response_format.model_dump(by_alias=True, exclude_none=True)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    for key, value in (("max_tokens", max_tokens), ("temperature", req.temperature), ("top_p", req.top_p),
                       ("stop", stop or None), ("seed", req.seed)):
        if value is not None:
            params[key] = value
    if not messages:
        raise bad_request("messages: at least one message besides the system messages is needed", param="messages")
    try:
        return GenerateRequestParams.model_validate(params, context={"limits": limits}), leading
    except ValidationError as exc:
        raise from_rpc(rpc.invalid_params(exc), offset=leading) from None


def _history(m: ChatMessage, index: int) -> dict[str, Any]:
    role = "system" if m.role == "developer" else m.role
    out: dict[str, Any] = {"role": role, "content": _text(m.content)}
    if m.role == "assistant" and m.content is None and not m.tool_calls:
        out["content"] = ""
    if m.tool_calls is not None:
        calls = []
        for k, call in enumerate(m.tool_calls):
            where = f"messages.{index}.tool_calls.{k}.function.arguments"
            try:
                arguments = json.loads(call.function.arguments or "{}", parse_constant=_no_constant)
            except (ValueError, RecursionError) as exc:
                raise bad_request(f"{where} is not valid JSON: {exc}", param=where) from None
            if not isinstance(arguments, dict):
                raise bad_request(f"{where} must be a JSON object", param=where)
            calls.append({"call_id": call.id, "name": call.function.name, "arguments": arguments})
        out["tool_calls"] = calls
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out
