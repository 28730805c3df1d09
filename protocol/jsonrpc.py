"""The JSON-RPC 2.0 envelope (https://www.jsonrpc.org/specification), decoded once per frame.

The server's per-frame loop::

    frame = parse_frame(text, max_batch=cfg.max_batch)
    replies = await asyncio.gather(*(handle(call) for call in frame.calls))  # None for notifications
    out = frame.reply(replies)
    if out is not None:
        await ws.send_text(encode(out))

and `handle(call)` is `bind_params(call)` (-> the method's params model, or an RpcError) then the
method itself; every RpcError becomes `error_response(call.id, exc)`, unless the call is a
notification, which never gets a response (not even an error), as the spec says. For `generate`
the error response is preceded by `notification("stream_end", StreamEnd.for_error(...))`, also
when bind_params fails: every generate that reaches handle() gets one stream_end, then one response.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from . import models as m
from .errors import InvalidParams, InvalidRequest, MethodNotFound, ParseError, RpcError, invalid_params

JsonId = str | int | float | None
DEFAULT_MAX_ID_CHARS = 256  # INFERENCE_MAX_ID_CHARS's default


@dataclass(frozen=True, slots=True)
class MethodSpec:
    """What the dispatcher and the OpenRPC document know about one method."""

    params: type[BaseModel]
    result: type[BaseModel]
    description: str
    errors: tuple[int, ...] = ()  # codes the method itself may return (envelope errors apply to all)


METHODS: dict[str, MethodSpec] = {
    "session.open": MethodSpec(
        m.SessionOpenParams, m.SessionOpenResult,
        "Open a session holding a system prompt and tools; its prefix is rendered and cached once.",
        (-32602, -32000, -32002, -32003, -32004)),
    "generate": MethodSpec(
        m.GenerateRequestParams, m.GenerateResult,
        "Generate one assistant turn. Streams text_chunk / reasoning_chunk / function_call_request "
        "notifications tagged with this request's id, then exactly one stream_end, then the response.",
        (-32602, -32000, -32001, -32002, -32003, -32004)),
    "cancel": MethodSpec(
        m.CancelParams, m.CancelResult,
        "Cancel a running generate of this connection by its JSON-RPC id; it still ends with "
        "stream_end (finish_reason \"cancelled\") and its response.",
        (-32602,)),
    "session.close": MethodSpec(
        m.SessionCloseParams, m.SessionCloseResult, "Close a session and release what it holds.",
        (-32602, -32001)),
    "server.info": MethodSpec(
        m.EmptyParams, m.ServerInfoResult, "Protocol version, model, backend, context length and limits.", ()),
    "rpc.discover": MethodSpec(
        m.EmptyParams, m.DiscoverResult, "This API as an OpenRPC 1.2.6 document.", ()),
}

# Server-to-client notifications: method -> (params model, description).
NOTIFICATIONS: dict[str, tuple[type[BaseModel], str]] = {
    "text_chunk": (m.TextChunk, "The next piece of assistant text (a delta)."),
    "reasoning_chunk": (m.ReasoningChunk, "The next piece of reasoning text, kept apart from the answer."),
    "function_call_request": (
        m.FunctionCallRequest, "One complete tool call whose arguments validated against the tool's schema."),
    "stream_end": (m.StreamEnd, "The last notification of a generate; exactly one per generate."),
}

# Methods whose notifications need the request's id: as a notification (no id) they cannot be
# served, and a null or fractional id cannot be a `request_id`.
_NEEDS_ID = frozenset({"generate"})


@dataclass(frozen=True, slots=True)
class Call:
    """One well-formed request (`is_notification` False) or notification of a known method."""

    method: str
    params: dict[str, Any] | list[Any] | None
    id: JsonId = None
    is_notification: bool = False  # no "id" member at all; `"id": null` is a request with id null


@dataclass(frozen=True, slots=True)
class Frame:
    """What one text frame asked for.

    - `error`: a response for the whole frame (parse error, empty or too long batch, nesting too
      deep); then `entries` is empty.
    - `entries`, in frame order: a Call to run, or a ready error response (a dict) for an element
      that is not a valid request or names an unknown method. Notifications that cannot be served
      (unknown method, generate without an id) are dropped, since notifications get no reply.
    - `is_batch`: the frame was an array, so the reply is an array (or nothing).
    """

    entries: tuple[Call | dict[str, Any], ...] = ()
    is_batch: bool = False
    error: dict[str, Any] | None = None

    @property
    def calls(self) -> list[Call]:
        return [e for e in self.entries if isinstance(e, Call)]

    def reply(self, replies: Sequence[dict[str, Any] | None]) -> dict[str, Any] | list[dict[str, Any]] | None:
        """The frame's reply, given one reply per `calls` item (None for a notification).

        None means send nothing (all notifications). A batch's reply is an array of the
        responses in frame order, per spec section 6.
        """
        if self.error is not None:
            return self.error
        calls = self.calls
        if len(replies) != len(calls):
            raise ValueError(f"Frame.reply: {len(calls)} calls but {len(replies)} replies")
        answers = iter(replies)
        out = [r for r in (next(answers) if isinstance(e, Call) else e for e in self.entries) if r is not None]
        if self.is_batch:
            return out or None
        return out[0] if out else None


# --------------------------------------------------------------------------- decoding


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e999 parses as inf, which cannot be encoded back as JSON
        raise ValueError(f"number {text[:32]} is out of range")
    return value


def _too_deep(value: Any, max_depth: int) -> bool:
    # Iterative, so the check itself cannot hit the recursion limit; only containers are visited.
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def _valid_id(value: Any) -> bool:
    # bool is an int subclass in Python but not a JSON number.
    return value is None or (isinstance(value, (str, int, float)) and not isinstance(value, bool))


def id_too_long(value: Any, max_id_chars: int) -> bool:
    """A string id longer than `max_id_chars` characters, or an integer id of more digits.

    Ids are echoed in every response and, for `generate`, in every notification: an unbounded id
    would multiply the size of everything the server sends for that request."""
    if isinstance(value, str):
        return len(value) > max_id_chars
    if isinstance(value, int) and not isinstance(value, bool):
        return value.bit_length() > 3 * max_id_chars and len(str(abs(value))) > max_id_chars
    return False


def _check_request(obj: Any, max_id_chars: int = DEFAULT_MAX_ID_CHARS) -> Call | dict[str, Any] | None:
    """One element: a Call, a ready error response, or None (a notification to drop)."""
    if not isinstance(obj, dict):
        return error_response(None, InvalidRequest(data={"reason": "a request must be a JSON object"}))
    has_id = "id" in obj
    rid = obj.get("id")
    if id_too_long(rid, max_id_chars):
        # Answered (it is a request), with id null: echoing the id is what the limit prevents.
        return error_response(None, InvalidRequest(data={
            "reason": f'the "id" member is longer than {max_id_chars} characters', "max_id_chars": max_id_chars}))
    reply_id = rid if _valid_id(rid) else None
    problem = None
    if obj.get("jsonrpc") != "2.0":
        problem = 'the "jsonrpc" member must be exactly "2.0"'
    elif not isinstance(obj.get("method"), str):
        problem = 'the "method" member must be a string'
    elif "params" in obj and not isinstance(obj["params"], (dict, list)):
        problem = 'the "params" member, when present, must be an object or an array'
    elif not _valid_id(rid):
        problem = 'the "id" member must be a string, a number or null'
    if problem is not None:
        return error_response(reply_id, InvalidRequest(data={"reason": problem}))
    method = obj["method"]
    if method not in METHODS:
        if not has_id:
            return None
        return error_response(rid, MethodNotFound(data={"method": method[:128]}))
    if method in _NEEDS_ID and not (isinstance(rid, (str, int)) and not isinstance(rid, bool)):
        if not has_id:
            return None
        return error_response(rid, InvalidRequest(data={
            "reason": f"{method} needs a string or integer id: its notifications carry it as request_id"}))
    return Call(method=method, params=obj.get("params"), id=rid, is_notification=not has_id)


def parse_frame(text: str, *, max_batch: int, max_depth: int = 64, max_id_chars: int = DEFAULT_MAX_ID_CHARS) -> Frame:
    """Decode and check one frame's envelope. Never raises for any input string.

    Parse errors, nesting deeper than `max_depth`, an empty batch and a batch longer than
    `max_batch` give `Frame.error` (id null). An id longer than `max_id_chars` is that element's
    -32600 with id null (`data.max_id_chars`). Params are not validated here: see bind_params.
    """
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        return Frame(error=error_response(None, InvalidRequest(
            data={"reason": f"JSON nested deeper than {max_depth} levels", "max_depth": max_depth})))
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, huge numbers
        return Frame(error=error_response(None, ParseError(data={"reason": str(exc)[:200]})))
    if isinstance(value, (dict, list)) and _too_deep(value, max_depth):
        return Frame(error=error_response(None, InvalidRequest(
            data={"reason": f"JSON nested deeper than {max_depth} levels", "max_depth": max_depth})))
    if not isinstance(value, list):
        entry = _check_request(value, max_id_chars)
        return Frame(entries=() if entry is None else (entry,))
    if not value:
        return Frame(error=error_response(None, InvalidRequest(data={"reason": "empty batch"})))
    if len(value) > max_batch:
        return Frame(error=error_response(None, InvalidRequest(data={
            "reason": f"batch of {len(value)} calls exceeds the limit of {max_batch}", "max_batch": max_batch})))
    entries = tuple(e for e in (_check_request(v, max_id_chars) for v in value) if e is not None)
    return Frame(entries=entries, is_batch=True)


def bind_params(call: Call, *, limits: m.RequestLimits | None = None) -> BaseModel:
    """Validate `call.params` against its method's params model; raise RpcError if they do not fit.

    Params must be named (an object); an array is -32602, except `[]` for methods without params.
    `limits`: the server's configured request limits (models.RequestLimits; defaults when None),
    which the models' validators read from the validation context.
    """
    spec = METHODS.get(call.method)
    if spec is None:
        raise MethodNotFound(data={"method": call.method})
    params = call.params
    if params is None or (params == [] and not spec.params.model_fields):
        params = {}
    if isinstance(params, list):
        reason = "params must be an object of named members; by-position (array) params are not accepted"
        raise InvalidParams(f"Invalid params: {reason}", {"errors": [{"field": "", "message": reason}]})
    try:
        return spec.params.model_validate(params, context={"limits": limits or m.RequestLimits()})
    except ValidationError as exc:
        raise invalid_params(exc) from None


# --------------------------------------------------------------------------- encoding


class RawJSON:
    """JSON text encoded once and spliced as is by `encode`: a large result served unchanged to
    every caller (rpc.discover's document) costs no per-call copy and no per-call encoding."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


# encode() puts this string where a RawJSON goes, then replaces it; the nonce keeps client text
# from ever matching it.
_RAW_MARK = f"\x00raw-json-{uuid.uuid4().hex}\x00"
_RAW_MARK_ENCODED = json.dumps(_RAW_MARK)


def _dump(value: Any) -> Any:
    if isinstance(value, RawJSON):
        return value
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def response(id: JsonId, result: Any) -> dict[str, Any]:
    """A success response; a pydantic model result is dumped in JSON mode."""
    return {"jsonrpc": "2.0", "result": _dump(result), "id": id}


def error_response(id: JsonId, error: RpcError) -> dict[str, Any]:
    """An error response; `id` is None when the request's id could not be read."""
    return {"jsonrpc": "2.0", "error": error.to_error(), "id": id}


def notification(method: str, params: BaseModel | dict[str, Any]) -> dict[str, Any]:
    """A server-to-client notification (no id)."""
    return {"jsonrpc": "2.0", "method": method, "params": _dump(params)}


def encode(obj: Any) -> str:
    """Compact JSON text that is always valid UTF-8 when encoded.

    Non-ASCII is written as is (smaller frames) unless a string holds a lone surrogate (JSON
    input may carry one as \\ud800), which UTF-8 cannot encode; then everything is escaped.
    """
    raws: list[str] = []

    def raw(value: Any) -> Any:
        if isinstance(value, RawJSON):
            raws.append(value.text)
            return _RAW_MARK
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")

    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=raw)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raws.clear()
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False, default=raw)
    if raws:
        parts = text.split(_RAW_MARK_ENCODED)
        if len(parts) != len(raws) + 1:  # cannot happen (the nonce); never splice ambiguously
            raise ValueError("encode: raw JSON placeholder mismatch")
        text = "".join(p + r for p, r in zip(parts, raws, strict=False)) + parts[-1]
    return text
