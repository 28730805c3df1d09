"""The OpenAI Responses wire (POST /v1/responses): the request model, the expansion of its
input items into chat-level history, its translation into one stateless generate, and the
bounded in-memory store of responses that `previous_response_id` continues.

As for chat completions (runtime.openai_wire): unknown fields are ignored, a wrong type is a
400 naming the field, and the translation builds protocol.models.GenerateRequestParams, so every
rule of /ws applies; its errors are reported with the Responses field names (`input.3`,
`instructions`, `max_output_tokens`, `tools.0.name`).

Input items become history messages: a message (role user, system, developer as system,
assistant; content a string or input_text / output_text parts), a function_call (joined to the
assistant message before it, as one turn), a function_call_output (a tool message). Reasoning
items a client re-sends are accepted and dropped (history carries no reasoning). The
instructions, then the leading system messages of the history, are the system prompt.
"""

from __future__ import annotations

import json
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol import errors as rpc
from protocol.fields import RequestLimits, _one_error
from protocol.models import GenerateRequestParams
from runtime.openai_wire import PART_SEPARATOR, OpenAIError, _no_constant, bad_request, from_rpc, json_object

# The store of responses (store=true), per API key. Its bounds are constants, not settings:
# entries are evicted least recently used first, and both bounds hold per key, so one key's
# traffic never evicts another's. Each entry is measured as its response plus its whole
# conversation, so memory stays bounded even though a chain of N turns stores N conversations;
# the owners are the configured API keys (one without keys), so the whole store is bounded.
STORE_MAX_ENTRIES = 1000  # responses kept per API key
STORE_MAX_BYTES = 64 * 1024 * 1024  # JSON bytes kept per API key
STORE_TTL_S = 3600.0  # an entry not read or written for this long is gone

FROM_PREVIOUS = "previous_response_id"  # the origin of history messages that come from a stored response
_UNSUPPORTED = {
    "conversation": "conversation: not supported; continue a conversation with previous_response_id",
    "background": "background: background responses are not supported",
}


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Req):
    type: Literal["input_text", "output_text"]
    text: str


Content = Annotated[str | list[TextPart], _one_error(
    'a string or a list of text parts ({"type": "input_text" or "output_text", "text": ...}); other parts are not supported')]


class MessageItem(_Req):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Content


class FunctionCallItem(_Req):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(_Req):
    type: Literal["function_call_output"]
    call_id: str
    output: Content


class FunctionToolDef(_Req):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(_Req):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(_Req):
    format: TextFormat | None = None


class ResponsesRequest(_Req):
    """POST /v1/responses. Accepted and ignored: include, reasoning, service_tier, user,
    prompt_cache_key, safety_identifier, truncation, max_tool_calls, top_logprobs (and any
    field this model does not name)."""

    model: str | None = None
    input: Annotated[str | list[Any], _one_error("a string or a list of input items")]
    instructions: str | None = None
    tools: list[Any] | None = None
    tool_choice: Annotated[str | dict[str, Any] | None, _one_error('"auto", "none", "required" or {"type": "function", "name": ...}')] = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = False
    store: bool | None = True
    previous_response_id: str | None = None
    text: TextConfig | None = None
    metadata: dict[str, str] | None = None
    background: Literal[False] | None = None  # background responses: not supported
    conversation: None = None  # conversations: not supported (previous_response_id is)


def parse_request(body: bytes) -> ResponsesRequest:
    """The request model from a body; 400 (naming the field) for bad JSON or a wrong type."""
    return _validate(ResponsesRequest, json_object(body), "")


def _validate(model: type[_Req], data: Any, where: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        loc = ".".join(str(p) for p in (where, *err["loc"]) if p != "")
        if loc in _UNSUPPORTED:
            raise bad_request(_UNSUPPORTED[loc], param=loc) from None
        raise bad_request(f"{loc}: {err['msg']}" if loc else err["msg"], param=loc or None) from None


# --------------------------------------------------------------------------- input -> history


def _text(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else PART_SEPARATOR.join(p.text for p in content)


def expand_input(value: str | list[Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """History messages (HistoryMessage dicts) for `input`, and for each the input field it
    came from (for errors)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}], ["input"]
    if not value:
        raise bad_request("input: at least one input item is needed", param="input")
    messages: list[dict[str, Any]] = []
    origins: list[str] = []
    for i, raw in enumerate(value):
        where = f"input.{i}"
        if not isinstance(raw, dict):
            raise bad_request(f"{where}: must be an input item (a JSON object)", param=where)
        kind = raw.get("type", "message")
        if kind == "message":
            m = _validate(MessageItem, raw, where)
            role = "system" if m.role == "developer" else m.role
            messages.append({"role": role, "content": _text(m.content)})
        elif kind == "function_call":
            c = _validate(FunctionCallItem, raw, where)
            call = {"call_id": c.call_id, "name": c.name, "arguments": _arguments(c.arguments, f"{where}.arguments")}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":  # the same turn: its text, then its calls
                last.setdefault("tool_calls", []).append(call)
                continue
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            o = _validate(FunctionCallOutputItem, raw, where)
            messages.append({"role": "tool", "tool_call_id": o.call_id, "content": _text(o.output)})
        elif kind == "reasoning":
            continue  # reasoning of an earlier turn a client replays: history carries none
        else:
            raise bad_request(f"{where}.type: input items of type {str(kind)[:64]!r} are not supported "
                              "(message, function_call, function_call_output, reasoning are)", param=f"{where}.type")
        origins.append(where)
    return messages, origins


def _arguments(text: str, where: str) -> dict[str, Any]:
    try:
        arguments = json.loads(text or "{}", parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"{where} is not valid JSON: {exc}", param=where) from None
    if not isinstance(arguments, dict):
        raise bad_request(f"{where} must be a JSON object", param=where)
    return arguments


def _tools(tools: list[Any] | None) -> list[dict[str, Any]] | None:
    """Responses' flat function tools as the chat shape GenerateRequestParams takes."""
    if tools is None:
        return None
    out = []
    for i, raw in enumerate(tools):
        where = f"tools.{i}"
        kind = raw.get("type") if isinstance(raw, dict) else None
        if kind != "function":
            raise bad_request(f"{where}.type: only function tools are supported here, not {str(kind)[:64]!r} "
                              '(send {"type": "function", "name", "description", "parameters"})', param=f"{where}.type")
        t = _validate(FunctionToolDef, raw, where)
        function: dict[str, Any] = {"name": t.name}
        for key in ("description", "parameters", "strict"):
            if getattr(t, key) is not None:
                function[key] = getattr(t, key)
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, dict):
        if choice.get("type") == "function" and isinstance(choice.get("name"), str):
            return {"type": "function", "function": {"name": choice["name"]}}
        raise bad_request('tool_choice: must be "auto", "none", "required" or {"type": "function", "name": <tool name>}; '
                          "hosted and allowed_tools choices are not supported", param="tool_choice")
    return choice


def response_format(text: TextConfig | None) -> dict[str, Any] | None:
    """text.format as GenerateRequestParams.response_format (None: plain text); the generate
    validates it (a json_schema needs name and schema)."""
    fmt = text.format if text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    schema = fmt.model_dump(by_alias=True, exclude_none=True, exclude={"type"})
    return {"type": "json_schema", "json_schema": schema}


@dataclass
class Plan:
    """One request as a generate: its params, its whole history (what is stored, without the
    instructions) and where each history message came from."""

    params: GenerateRequestParams
    history: list[dict[str, Any]]
    origins: list[str]
    leading: int  # leading system messages of `history`, now in the system prompt

    def error(self, exc: rpc.RpcError) -> OpenAIError:
        return responses_error(exc, self.origins[self.leading:])


def to_generate(req: ResponsesRequest, previous: list[dict[str, Any]], limits: RequestLimits) -> Plan:
    """The stateless generate for a request continuing `previous` (a stored conversation)."""
    new, new_origins = expand_input(req.input)
    history = [*previous, *new]
    origins = [FROM_PREVIOUS] * len(previous) + new_origins
    leading = 0
    system = [req.instructions] if req.instructions else []
    while leading < len(history) and history[leading]["role"] == "system":
        system.append(history[leading]["content"])
        leading += 1
    messages = history[leading:]
    if not messages:
        raise bad_request("input: at least one item besides system messages is needed", param="input")
    params: dict[str, Any] = {"messages": messages, "system_prompt": "\n\n".join(system) if system else None,
                              "tools": _tools(req.tools)}
    if req.tool_choice is not None:
        params["tool_choice"] = _tool_choice(req.tool_choice)
    fmt = response_format(req.text)
    if fmt is not None:
        params["response_format"] = fmt
    for key, value in (("parallel_tool_calls", req.parallel_tool_calls), ("max_tokens", req.max_output_tokens),
                       ("temperature", req.temperature), ("top_p", req.top_p)):
        if value is not None:
            params[key] = value
    try:
        generate = GenerateRequestParams.model_validate(params, context={"limits": limits})
    except ValidationError as exc:
        raise responses_error(rpc.invalid_params(exc), origins[leading:]) from None
    return Plan(generate, history, origins, leading)


_RENAMES = {"system_prompt": "instructions", "max_tokens": "max_output_tokens", "tool_choice.function.name": "tool_choice.name"}
_MESSAGE_INDEX = re.compile(r"\bmessages\.(\d+)")


def responses_error(exc: rpc.RpcError, origins: list[str]) -> OpenAIError:
    """The OpenAI error for a JSON-RPC error of a generate whose messages.N came from `origins[N]`."""
    if exc.code != rpc.INVALID_PARAMS:
        err = from_rpc(exc)
        err.param = {"messages": "input", "response_format": "text.format"}.get(err.param or "", err.param)
        return err
    errors = (exc.data or {}).get("errors") or [{}]
    field_name = str(errors[0].get("field") or "")
    message = exc.message.removeprefix("Invalid params: ")

    def origin(m: re.Match[str]) -> str:
        n = int(m.group(1))
        return origins[n] if n < len(origins) else "input"

    parts = field_name.split(".")
    if parts[0] == "messages":
        named = _MESSAGE_INDEX.search(field_name) or _MESSAGE_INDEX.search(message)
        param = origin(named) if named is not None else "input"
        message = _MESSAGE_INDEX.sub(origin, message).replace("tool_call_id", "call_id")
    elif parts[0] == "tools" and len(parts) > 3 and parts[2] == "function":
        param = ".".join([*parts[:2], *parts[3:]])
        message = message.replace(field_name, param, 1)
    elif parts[0] == "response_format":  # response_format.json_schema.X is text.format.X
        param = ".".join(["text.format", *parts[2:]])
        message = message.replace(field_name, param, 1)
    else:
        param = _RENAMES.get(field_name, field_name)
        message = message.replace(field_name, param, 1)
    return bad_request(message, param=param or None, code="invalid_value")


# --------------------------------------------------------------------------- the store


@dataclass
class Stored:
    response: dict[str, Any]
    messages: list[dict[str, Any]]  # the conversation up to and including this response's turn
    size: int
    used: float = 0.0


@dataclass
class ResponseStore:
    """Stored responses per owner (API key identity): LRU by entries and bytes, idle TTL.
    Another owner's id is not found, exactly like a missing one."""

    max_entries: int = STORE_MAX_ENTRIES
    max_bytes: int = STORE_MAX_BYTES
    ttl_s: float = STORE_TTL_S
    clock: Any = time.monotonic
    _owners: dict[str, OrderedDict[str, Stored]] = field(default_factory=dict)
    _bytes: dict[str, int] = field(default_factory=dict)

    def get(self, owner: str, response_id: str) -> Stored | None:
        entries = self._expire(owner)
        entry = entries.get(response_id) if entries is not None else None
        if entries is None or entry is None:
            return None
        entry.used = self.clock()
        entries.move_to_end(response_id)
        return entry

    def put(self, owner: str, response: dict[str, Any], messages: list[dict[str, Any]]) -> bool:
        """Keep `response` (False: alone it is over the byte bound, so it is not kept)."""
        size = len(json.dumps(response, ensure_ascii=False)) + len(json.dumps(messages, ensure_ascii=False))
        if size > self.max_bytes:
            return False
        self.delete(owner, response["id"])
        entries = self._expire(owner)
        if entries is None:
            entries = self._owners[owner] = OrderedDict()
            self._bytes[owner] = 0
        entries[response["id"]] = Stored(response, messages, size, self.clock())
        self._bytes[owner] += size
        while len(entries) > self.max_entries or self._bytes[owner] > self.max_bytes:
            _, evicted = entries.popitem(last=False)
            self._bytes[owner] -= evicted.size
        return True

    def delete(self, owner: str, response_id: str) -> bool:
        entries = self._expire(owner)
        entry = entries.pop(response_id, None) if entries is not None else None
        if entry is None:
            return False
        self._bytes[owner] -= entry.size
        self._drop_if_empty(owner)
        return True

    def __len__(self) -> int:
        return sum(len(e) for e in self._owners.values())

    def _expire(self, owner: str) -> OrderedDict[str, Stored] | None:
        entries = self._owners.get(owner)
        if entries is None:
            return None
        deadline = self.clock() - self.ttl_s
        while entries:  # least recently used first: stop at the first one still fresh
            oldest = next(iter(entries.values()))
            if oldest.used > deadline:
                break
            entries.popitem(last=False)
            self._bytes[owner] -= oldest.size
        if not entries:
            self._drop_if_empty(owner)
            return None
        return entries

    def _drop_if_empty(self, owner: str) -> None:
        if not self._owners.get(owner):
            self._owners.pop(owner, None)
            self._bytes.pop(owner, None)
