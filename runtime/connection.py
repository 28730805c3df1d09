"""One WebSocket connection of the JSON-RPC front end (/ws).

Its reader loop decodes frames and starts one task per call, so a long `generate` never holds
up `cancel` or `server.info`; its writer task drains a bounded queue, so a client that stops
reading is closed (1008) instead of growing memory. Every `generate` with an id ends with
exactly one `stream_end` and one response, whatever happens: the handler's `finally`
guarantees it. Outgoing frames are built from protocol's models.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from typing import Any, cast

from starlette.websockets import WebSocket, WebSocketDisconnect

from protocol import errors as rpc
from protocol import jsonrpc
from protocol.models import (
    CancelResult,
    ErrorObject,
    FunctionCallRequest,
    GenerateRequestParams,
    ReasoningChunk,
    StreamEnd,
    TextChunk,
)
from protocol.openrpc import openrpc_json
from runtime.metrics import METRICS
from runtime.outbox import CLOSE_TIMEOUT_S, CLOSE_TOO_BIG, CLOSE_UNSUPPORTED_DATA, Outbox
from runtime.server import Server
from runtime.turn import TurnOutcome

log = logging.getLogger("runtime.app")
reqlog = logging.getLogger("runtime.requests")

# The notifications of a turn, by the kind runtime.turn emits.
EVENTS = {"text_chunk": TextChunk, "reasoning_chunk": ReasoningChunk, "function_call_request": FunctionCallRequest}


class _ClosedBeforeStart(Exception):
    """A generate found its connection closed: it ends cancelled without reaching the engine."""


@functools.lru_cache(maxsize=1)
def _discover_result() -> jsonrpc.RawJSON:
    # Encoded once; every rpc.discover splices the same text (no copy, no encoding per call).
    return jsonrpc.RawJSON(openrpc_json())


class Connection(Outbox):
    def __init__(self, server: Server, ws: WebSocket, owner: str):
        super().__init__(server, ws)
        self.owner = owner
        self.generates: dict[Any, asyncio.Event] = {}
        self.tasks: set[asyncio.Task] = set()
        self.pending_calls = 0  # calls other than generate being answered
        self.max_pending_calls = 2 * server.cfg.max_batch

    def busy(self) -> bool:
        """A call of this connection is still running (its answer not queued yet)."""
        return bool(self.generates) or any(not t.done() for t in self.tasks)

    def cancel_all(self) -> None:
        for event in self.generates.values():
            event.set()

    def fail_inflight(self, reason: str) -> None:
        for task in list(self.tasks):
            # A generate that has not started yet is left alone: it finds the engine down by
            # itself and answers -32004 with its stream_end (cancelling it before its first step
            # would lose both).
            if getattr(task, "is_generate", False) and getattr(task, "started", False) and not task.done():
                task.engine_failure = reason  # type: ignore[attr-defined]
                task.cancel()

    # ------------------------------------------------------------------ reading
    async def run(self) -> None:
        self._writer = asyncio.create_task(self.writer())
        self._reader = asyncio.create_task(self._read())
        reader, writer = self._reader, self._writer
        try:
            await asyncio.wait({reader})
        finally:
            self.start_close(None)  # no-op when already closing
            if not reader.done():
                reader.cancel()
            pending = [t for t in self.tasks if not t.done()]
            if pending:  # let cancelled generates abort their engine requests
                await asyncio.wait(pending, timeout=10)
            writer.cancel()
            closing = self._closing
            for task in (reader, writer, closing):
                if task is None:
                    continue
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(task, timeout=CLOSE_TIMEOUT_S + 1)
            self._drop_outbox()
            if reader.done() and not reader.cancelled() and reader.exception() is not None:
                exc = reader.exception()
                if not isinstance(exc, WebSocketDisconnect):
                    log.warning("connection %s: reader failed: %r", self.cid, exc)

    async def _read(self) -> None:
        while not self.closed:
            message = await self.ws.receive()
            kind = message["type"]
            if kind == "websocket.disconnect":
                # At once, so calls read before the close see it and end without starting.
                self.start_close(None)
                break
            if message.get("bytes") is not None:
                await self.close(CLOSE_UNSUPPORTED_DATA, "binary frames are not accepted; send JSON text frames")
                break
            text = message.get("text") or ""
            if len(text.encode("utf-8", "surrogatepass")) > self.server.cfg.max_frame_bytes:
                await self.close(CLOSE_TOO_BIG, f"frame larger than {self.server.cfg.max_frame_bytes} bytes")
                break
            await self.on_frame(text)
            # uvicorn's receive() returns without yielding while frames are queued: let the
            # other connections run between two frames of this one.
            await asyncio.sleep(0)

    async def on_frame(self, text: str) -> None:
        if self.closed:  # read before the connection closed: nobody to answer
            return
        cfg = self.server.cfg
        frame = jsonrpc.parse_frame(text, max_batch=cfg.max_batch, max_id_chars=cfg.max_id_chars)
        if frame.error is not None:
            METRICS.errors.labels(code=str(frame.error["error"]["code"])).inc()
            await self.send(frame.error)
            return
        calls = frame.calls
        if not calls:
            reply = frame.reply([])
            if reply is not None:
                await self.send(reply)
            return
        # Backpressure: calls other than generate (bounded on their own) run concurrently up to
        # a budget; past it the reader waits, so a client flooding cheap calls is slowed down
        # by TCP instead of filling this process with tasks.
        cost = sum(1 for c in calls if c.method != "generate")
        while self.pending_calls and self.pending_calls + cost > self.max_pending_calls and not self.closed:
            self._calls_done.clear()
            await self._calls_done.wait()
        if self.closed:
            return
        self.pending_calls += cost
        task = asyncio.create_task(self._answer(frame, calls))
        self.tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self.tasks.discard(t)
            self.pending_calls -= cost
            self._calls_done.set()

        task.add_done_callback(done)

    async def _answer(self, frame: jsonrpc.Frame, calls: list[jsonrpc.Call]) -> None:
        if len(calls) == 1 and not frame.is_batch:
            replies = [await self._call_task(calls[0])]
        else:
            replies = list(await asyncio.gather(*(self._call_task(c) for c in calls)))
        reply = frame.reply(replies)
        if reply is not None:
            await self.send(reply)

    async def _call_task(self, call: jsonrpc.Call) -> dict[str, Any] | None:
        # Each call in its own task so engine failures can cancel generates individually.
        task = asyncio.create_task(self.dispatch(call))
        task.is_generate = call.method == "generate"  # type: ignore[attr-defined]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        try:
            return await task
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if not task.cancelled() or (me is not None and me.cancelling()):
                raise  # this task itself is being cancelled
            # The call's task was cancelled before it could answer (it never ran): still exactly
            # one answer per id, and for a generate its stream_end first.
            return await self._answer_unstarted(call, getattr(task, "engine_failure", None))

    async def _answer_unstarted(self, call: jsonrpc.Call, reason: str | None) -> dict[str, Any] | None:
        error = rpc.EngineUnavailable(f"{reason}; the runtime is restarting it" if reason else "the request was cancelled")
        METRICS.errors.labels(code=str(error.code)).inc()
        if call.method == "generate":
            end = StreamEnd(request_id=cast(str | int, call.id), finish_reason="error", usage=TurnOutcome().usage(),
                            timings=TurnOutcome().timings(), error=ErrorObject(**error.to_error()))
            await self.send(jsonrpc.notification("stream_end", end))
        return None if call.is_notification else jsonrpc.error_response(call.id, error)

    async def dispatch(self, call: jsonrpc.Call) -> dict[str, Any] | None:
        started = time.perf_counter()
        outcome = "ok"
        try:
            if call.method == "generate":
                return await self._generate(call)
            result = await self._simple(call)
            return None if call.is_notification else jsonrpc.response(call.id, result)
        except rpc.RpcError as exc:
            outcome = f"error:{exc.code}"
            METRICS.errors.labels(code=str(exc.code)).inc()
            return None if call.is_notification else jsonrpc.error_response(call.id, exc)
        except Exception as exc:
            outcome = "error:-32603"
            log.exception("internal error in %s", call.method)
            METRICS.errors.labels(code=str(rpc.INTERNAL_ERROR)).inc()
            err = rpc.InternalError(f"internal error: {type(exc).__name__}")
            return None if call.is_notification else jsonrpc.error_response(call.id, err)
        finally:
            if call.method != "generate":
                METRICS.requests.labels(method=call.method, outcome=outcome.split(":")[0]).inc()
                self._log_request(call, outcome, started)

    async def _simple(self, call: jsonrpc.Call) -> Any:
        params: Any = jsonrpc.bind_params(call, limits=self.server.limits)
        s = self.server
        if call.method == "server.info":
            self._need_backend_info()
            return s.info()
        if call.method == "rpc.discover":
            return _discover_result()
        if call.method == "cancel":
            limit = s.cfg.max_id_chars
            if jsonrpc.id_too_long(params.request_id, limit):
                reason = f"longer than {limit} characters (max_id_chars); no generate can have that id"
                raise rpc.InvalidParams(f"Invalid params: request_id: {reason}",
                                        {"errors": [{"field": "request_id", "message": reason}], "max_id_chars": limit})
            event = self.generates.get(params.request_id)
            if event is None or event.is_set():
                return CancelResult(cancelled=False)
            event.set()
            return CancelResult(cancelled=True)
        if call.method == "session.open":
            self._refuse_if_draining()
            tools = [t.model_dump(exclude_none=True) for t in params.tools] if params.tools is not None else None
            return await s.runtime.open_session(system_prompt=params.system_prompt, tools=tools, owner=self.owner)
        if call.method == "session.close":
            return s.runtime.close_session(params.session_id, owner=self.owner)
        raise rpc.MethodNotFound(data={"method": call.method})

    def _need_backend_info(self) -> None:
        try:
            _ = self.server.backend.info
        except Exception:
            raise rpc.EngineUnavailable("the engine is still starting") from None

    def _refuse_if_draining(self) -> None:
        if self.server.draining:
            raise rpc.EngineUnavailable("the server is shutting down")

    async def _generate(self, call: jsonrpc.Call) -> dict[str, Any]:
        me = asyncio.current_task()
        if me is not None:
            me.started = True  # type: ignore[attr-defined]  # fail_inflight may cancel it from now on
        rid = cast(str | int, call.id)  # parse_frame refuses a generate without a string or integer id
        cancelled = asyncio.Event()
        out = TurnOutcome()
        error: rpc.RpcError | None = None
        started = time.perf_counter()
        params: GenerateRequestParams | None = None
        registered = False
        if rid in self.generates:
            # Answered without a stream_end: that request_id already has a stream of its own.
            METRICS.errors.labels(code=str(rpc.INVALID_REQUEST)).inc()
            return jsonrpc.error_response(rid, rpc.InvalidRequest(
                f"a generate with id {rid!r} is already running on this connection", {"reason": "duplicate id in flight"}))
        METRICS.generates_inflight.inc()
        try:
            params = cast(GenerateRequestParams, jsonrpc.bind_params(call, limits=self.server.limits))
            if len(self.generates) >= self.server.cfg.max_inflight_per_connection:
                raise rpc.Overloaded(500, f"at most {self.server.cfg.max_inflight_per_connection} generates in flight per connection")
            self._refuse_if_draining()
            self.generates[rid] = cancelled
            registered = True
            if self.closed:
                # The connection closed before this generate started (a close frame read in the
                # same buffer as the request): it ends cancelled at once, the engine never sees it.
                cancelled.set()
                out.finish_reason = "cancelled"
                raise _ClosedBeforeStart

            async def emit(kind: str, payload: dict[str, Any]) -> None:
                await self.send(jsonrpc.notification(kind, EVENTS[kind](request_id=rid, **payload)))

            out = await self.server.runtime.generate(
                params, owner=self.owner, emit=emit, cancelled=cancelled, rid=f"{self.cid}-{uuid.uuid4().hex[:12]}"
            )
            error = out.error
        except _ClosedBeforeStart:
            pass
        except rpc.RpcError as exc:
            error = exc
            out.finish_reason = "error"
        except asyncio.CancelledError:
            # An engine failure (fail_inflight), the connection going away, or any other cancel:
            # the generate still ends with its stream_end and its response (PROTOCOL section 5.1).
            reason = getattr(me, "engine_failure", None)
            if me is not None:
                me.uncancel()
            error = rpc.EngineUnavailable(f"{reason}; the runtime is restarting it") if reason else None
            out.finish_reason = "error" if reason else "cancelled"
        except Exception as exc:
            log.exception("generate failed")
            error = rpc.InternalError(f"internal error: {type(exc).__name__}")
            out.finish_reason = "error"
        finally:
            if registered:
                self.generates.pop(rid, None)
            METRICS.generates_inflight.dec()
            if out.total_ms == 0.0:
                out.total_ms = (time.perf_counter() - started) * 1000
            if error is None and out.finish_reason == "error":
                # Never a stream_end with finish_reason "error" and no error (PROTOCOL section 5.4).
                error = rpc.InternalError("the turn failed")
            if error is not None:
                out.finish_reason = "error"
            end = StreamEnd(request_id=rid, finish_reason=out.finish_reason, usage=out.usage(), timings=out.timings(),
                            error=None if error is None else ErrorObject(**error.to_error()))
            await self.send(jsonrpc.notification("stream_end", end))
            outcome = "ok" if error is None else f"error:{error.code}"
            if error is not None and out.error is None:
                METRICS.errors.labels(code=str(error.code)).inc()
            METRICS.requests.labels(method="generate", outcome=outcome.split(":")[0]).inc()
            self._log_request(call, outcome, started, out=out, session_id=getattr(params, "session_id", None))
        if error is not None:
            return jsonrpc.error_response(rid, error)
        return jsonrpc.response(rid, out.result())

    def _log_request(self, call: jsonrpc.Call, outcome: str, started: float, *, out: TurnOutcome | None = None,
                     session_id: str | None = None) -> None:
        if not self.server.cfg.log_json:
            return
        record: dict[str, Any] = {
            "event": "request",
            "connection": self.cid,
            "method": call.method,
            "request_id": call.id,
            "outcome": outcome,
            "ms": round((time.perf_counter() - started) * 1000, 3),
        }
        if out is not None:
            record.update(session_id=session_id or out.session_id, finish_reason=out.finish_reason,
                          **out.usage().model_dump(), **out.timings().model_dump())
        reqlog.info(json.dumps(record, default=str))
