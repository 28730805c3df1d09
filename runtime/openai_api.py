"""An OpenAI-compatible HTTP front end on the same runtime as /ws: /v1/models and
/v1/chat/completions (plain and streamed as server-sent events).

Same API keys (Authorization: Bearer), limits, metrics and engine as /ws. A chat completion is
a stateless generate (runtime.service.AgentRuntime.generate) over the whole history the client
re-sends; the wire and its translation are runtime.openai_wire.

Each request runs its generate in a task of its own, registered with the server like a
connection, so SIGTERM drains it and a dead engine ends it (503). A client that goes away
cancels its generate (the engine request is aborted): a streaming one as soon as Starlette sees
the disconnect, a plain one within DISCONNECT_POLL_S.

Streaming: a first chunk with delta.role; text (and reasoning_content) deltas as they come;
each tool call once, whole and valid (index, id, type, function.name and function.arguments in
one chunk); a last chunk with finish_reason; with stream_options.include_usage a usage chunk
with `choices: []`; then `data: [DONE]`. An error after the stream started is sent as
`data: {"error": {...}}`, then `data: [DONE]`; before it started, as an HTTP error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from protocol import errors as rpc
from protocol.models import GenerateRequestParams
from runtime.metrics import METRICS
from runtime.openai_wire import ChatCompletionRequest, OpenAIError, from_rpc, parse_request, to_generate
from runtime.server import Server
from runtime.turn import TurnOutcome

log = logging.getLogger("runtime.openai")

DISCONNECT_POLL_S = 0.25  # how often a plain (not streamed) request checks that its client is still there
OWNED_BY = "agent-runtime"
FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "cancelled": "stop"}

Event = tuple[str, dict[str, Any]]
_RUNNING: set[asyncio.Task[None]] = set()  # generate tasks, referenced until they end


class _HttpPeer:
    """One HTTP generate as the server sees a connection (runtime.server.Peer): drained on
    SIGTERM, failed when the engine dies."""

    def __init__(self, cancelled: asyncio.Event):
        self.generates: dict[Any, asyncio.Event] = {"generate": cancelled}
        self.task: asyncio.Task[None] | None = None
        self.failure: str | None = None

    def busy(self) -> bool:
        return self.task is not None and not self.task.done()

    def cancel_all(self) -> None:
        for event in self.generates.values():
            event.set()

    def fail_inflight(self, reason: str) -> None:
        if self.task is not None and not self.task.done():
            self.failure = reason
            self.task.cancel()

    async def close(self, code: int, reason: str = "") -> None:
        return None  # the HTTP response ends on its own


class _Generation:
    """A generate running in its own task; its events come out of `queue`, None ends them."""

    def __init__(self, server: Server, params: GenerateRequestParams, owner: str):
        self.server = server
        self.cancelled = asyncio.Event()
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self.out = TurnOutcome()
        self.error: rpc.RpcError | None = None
        self.ended = False
        self._next_check = 0.0  # when `next` checks the client's connection again
        self.peer = _HttpPeer(self.cancelled)
        task = asyncio.create_task(self._run(params, owner))
        self.peer.task = task
        server.connections.add(self.peer)
        _RUNNING.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        _RUNNING.discard(task)
        self.server.connections.discard(self.peer)

    async def _run(self, params: GenerateRequestParams, owner: str) -> None:
        async def emit(kind: str, payload: dict[str, Any]) -> None:
            self.queue.put_nowait((kind, payload))

        METRICS.generates_inflight.inc()
        counted = False
        try:
            self.out = await self.server.runtime.generate(params, owner=owner, emit=emit, cancelled=self.cancelled,
                                                          rid=f"oai-{uuid.uuid4().hex[:16]}")
            self.error, counted = self.out.error, self.out.error is not None  # observe_turn counted it
            if self.error is None and self.out.finish_reason == "error":
                self.error = rpc.InternalError("the turn failed")
        except rpc.RpcError as exc:
            self.error = exc
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is not None:
                me.uncancel()
            reason = self.peer.failure or "the request was cancelled"
            self.error = rpc.EngineUnavailable(f"{reason}; the runtime is restarting it")
        except Exception as exc:
            log.exception("/v1 generate failed")
            self.error = rpc.InternalError(f"internal error: {type(exc).__name__}")
        finally:
            METRICS.generates_inflight.dec()
            if self.error is not None and not counted:
                METRICS.errors.labels(code=str(self.error.code)).inc()
            self.queue.put_nowait(None)

    async def next(self, request: Request | None) -> Event | None:
        """The next event (None: the generate ended). With `request`, a client that went away
        meanwhile cancels the generate, checked every DISCONNECT_POLL_S whether or not events
        come (used outside a StreamingResponse, which watches its client itself)."""
        if self.ended:
            return None
        get = asyncio.ensure_future(self.queue.get())
        try:
            while True:
                if request is not None and not self.cancelled.is_set() and time.monotonic() >= self._next_check:
                    self._next_check = time.monotonic() + DISCONNECT_POLL_S
                    if await request.is_disconnected():
                        self.cancelled.set()
                done, _ = await asyncio.wait({get}, timeout=None if request is None else DISCONNECT_POLL_S)
                if done:
                    break
        finally:
            get.cancel()
        item = get.result()
        self.ended = item is None
        return item


def openai_routes(server: Server) -> list[Route]:
    """The /v1 routes on `server` (add them to the Starlette app next to /ws)."""
    created = int(time.time())

    def card(model: str) -> dict[str, Any]:
        return {"id": model, "object": "model", "created": created, "owned_by": OWNED_BY}

    async def list_models(request: Request) -> Response:
        authorize(server, request)
        return JSONResponse({"object": "list", "data": [card(served_model(server))]})

    async def get_model(request: Request) -> Response:
        authorize(server, request)
        model, wanted = served_model(server), request.path_params["model_id"]
        if wanted != model:
            raise OpenAIError(404, f"The model {wanted!r} does not exist; this server serves {model!r}",
                              param="model", code="model_not_found")
        return JSONResponse(card(model))

    async def chat_completions(request: Request) -> Response:
        owner = authorize(server, request)
        refuse_when_draining(server)
        req = parse_request(await _body(request, server.cfg.max_frame_bytes))
        params, offset = to_generate(req, server.limits)
        model = served_model(server)
        gen = _Generation(server, params, owner)
        reasoning: list[str] = []
        try:
            first = await gen.next(request)
            if first is None and gen.error is not None:  # refused or failed before any output
                raise from_rpc(gen.error, offset=offset)
            meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model}
            if req.stream:
                return StreamingResponse(_sse(gen, first, req, meta), media_type="text/event-stream",
                                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
            item = first
            while item is not None:
                if item[0] == "reasoning_chunk":
                    reasoning.append(item[1]["text"])
                item = await gen.next(request)
        except BaseException:
            gen.cancelled.set()  # this handler is going away (server shutdown): so does its generate
            raise
        if gen.error is not None:
            raise from_rpc(gen.error, offset=offset)
        out = gen.out
        message: dict[str, Any] = {"role": "assistant", "content": (out.text or None) if out.tool_calls else out.text}
        if reasoning:
            message["reasoning_content"] = "".join(reasoning)
        if out.tool_calls:
            message["tool_calls"] = [_call(c) for c in out.tool_calls]
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": FINISH.get(out.finish_reason, "stop")}
        return JSONResponse({**meta, "object": "chat.completion", "choices": [choice], "usage": _usage(out)},
                            headers={"server-timing": _server_timing(out)})

    return [
        Route("/v1/models", _handler("openai.models", list_models), methods=["GET"]),
        Route("/v1/models/{model_id:path}", _handler("openai.models", get_model), methods=["GET"]),
        Route("/v1/chat/completions", _handler("openai.chat.completions", chat_completions), methods=["POST"]),
    ]


def served_model(server: Server) -> str:
    """The model the engine serves; 503 while it is not ready."""
    try:
        return server.backend.info.model
    except Exception:
        raise OpenAIError(503, "the engine is not ready (starting, restarting, or stopped); retry shortly",
                          type="service_unavailable_error", code="engine_unavailable",
                          headers={"retry-after-ms": "1000", "retry-after": "1"}) from None


def authorize(server: Server, request: Request) -> str:
    """The request's owner (API key identity); 401 without a valid key."""
    owner = server.owner_for(request.headers)
    if owner is None:
        raise OpenAIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    return owner


def refuse_when_draining(server: Server) -> None:
    if server.draining:
        raise OpenAIError(503, "the server is shutting down", type="service_unavailable_error", code="engine_unavailable")


def _handler(method: str, fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """`fn` answering its OpenAIErrors in OpenAI's shape, counted in agent_runtime_requests
    (a stream is counted when it ends)."""

    async def handle(request: Request) -> Response:
        try:
            response = await fn(request)
        except Exception as exc:
            if not isinstance(exc, OpenAIError):
                log.exception("internal error in %s", method)
                METRICS.errors.labels(code=str(rpc.INTERNAL_ERROR)).inc()
                exc = OpenAIError(500, f"internal error: {type(exc).__name__}", type="server_error", code="internal_error")
            METRICS.requests.labels(method=method, outcome="error").inc()
            return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
        if not isinstance(response, StreamingResponse):
            METRICS.requests.labels(method=method, outcome="ok").inc()
        return response

    return handle


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    too_big = OpenAIError(413, f"the request body is larger than {limit} bytes (max_frame_bytes)", code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _call(call: dict[str, Any]) -> dict[str, Any]:
    return {"id": call["call_id"], "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}


def _server_timing(out: TurnOutcome) -> str:
    """The turn's own timings (W3C Server-Timing, ms): a client sees a tool call only when complete."""
    ttft = [] if out.ttft_ms is None else [f"ttft;dur={out.ttft_ms:.3f}"]
    return ", ".join([*ttft, f"total;dur={out.total_ms:.3f}"])


def _usage(out: TurnOutcome) -> dict[str, Any]:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": out.cached_tokens}}


def _data(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(gen: _Generation, first: Event | None, req: ChatCompletionRequest, meta: dict[str, Any]) -> AsyncIterator[str]:
    include_usage = req.stream_options is not None and req.stream_options.include_usage
    base = {**meta, "object": "chat.completion.chunk"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        body: dict[str, Any] = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
        return _data(body)

    outcome = "ok"
    try:
        yield chunk({"role": "assistant", "content": ""})
        calls = 0
        item = first
        while item is not None:
            kind, payload = item
            if kind == "text_chunk":
                yield chunk({"content": payload["text"]})
            elif kind == "reasoning_chunk":
                yield chunk({"reasoning_content": payload["text"]})
            elif kind == "function_call_request":
                yield chunk({"tool_calls": [{"index": calls, **_call(payload)}]})
                calls += 1
            item = await gen.next(None)
        if gen.error is not None:
            outcome = "error"
            yield _data(from_rpc(gen.error).body())
        else:
            yield chunk({}, FINISH.get(gen.out.finish_reason, "stop"))
            if include_usage:
                yield _data({**base, "choices": [], "usage": _usage(gen.out)})
        yield "data: [DONE]\n\n"
    finally:
        if not gen.ended:  # the client went away: stop generating (the engine request is aborted)
            gen.cancelled.set()
        METRICS.requests.labels(method="openai.chat.completions", outcome=outcome).inc()
