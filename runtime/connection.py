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
import json
import logging
import time
import uuid
from typing import Any, cast

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

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
from protocol.openrpc import openrpc_document
from runtime.metrics import METRICS
from runtime.server import Server
from runtime.turn import TurnOutcome

log = logging.getLogger("runtime.app")
reqlog = logging.getLogger("runtime.requests")

# The notifications of a turn, by the kind runtime.turn emits.
EVENTS = {"text_chunk": TextChunk, "reasoning_chunk": ReasoningChunk, "function_call_request": FunctionCallRequest}
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009


class Connection:
    def __init__(self, server: Server, ws: WebSocket, owner: str):
        self.server = server
        self.ws = ws
        self.owner = owner
        self.cid = uuid.uuid4().hex[:12]
        self.queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=server.cfg.send_queue_frames)
        self.generates: dict[Any, asyncio.Event] = {}
        self.tasks: set[asyncio.Task] = set()
        self.closed = False
        self.close_code: int | None = None

    # ------------------------------------------------------------------ sending
    async def send(self, obj: Any) -> None:
        if self.closed:
            return
        try:
            self.queue.put_nowait(jsonrpc.encode(obj))
        except asyncio.QueueFull:
            log.warning("connection %s: client is not reading (%d frames queued); closing", self.cid, self.queue.qsize())
            await self.close(CLOSE_POLICY, "send queue full: client is not reading")

    async def writer(self) -> None:
        while True:
            frame = await self.queue.get()
            if frame is None:
                return
            try:
                await self.ws.send_text(frame)
            except Exception:
                self.closed = True
                self.cancel_all()
                return

    async def close(self, code: int, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        self.close_code = code
        self.cancel_all()
        with contextlib.suppress(Exception):
            if self.ws.application_state != WebSocketState.DISCONNECTED:
                # A client that does not read may never take the close frame either: bounded.
                await asyncio.wait_for(self.ws.close(code=code, reason=reason[:120]), timeout=5)

    def cancel_all(self) -> None:
        for event in self.generates.values():
            event.set()

    def fail_inflight(self, reason: str) -> None:
        for task in list(self.tasks):
            if getattr(task, "is_generate", False) and not task.done():
                task.engine_failure = reason  # type: ignore[attr-defined]
                task.cancel()

    # ------------------------------------------------------------------ reading
    async def run(self) -> None:
        writer = asyncio.create_task(self.writer())
        try:
            while not self.closed:
                message = await self.ws.receive()
                kind = message["type"]
                if kind == "websocket.disconnect":
                    break
                if message.get("bytes") is not None:
                    await self.close(CLOSE_UNSUPPORTED_DATA, "binary frames are not accepted; send JSON text frames")
                    break
                text = message.get("text") or ""
                if len(text.encode("utf-8", "surrogatepass")) > self.server.cfg.max_frame_bytes:
                    await self.close(CLOSE_TOO_BIG, f"frame larger than {self.server.cfg.max_frame_bytes} bytes")
                    break
                await self.on_frame(text)
        except WebSocketDisconnect:
            pass
        finally:
            self.closed = True
            self.cancel_all()
            pending = [t for t in self.tasks if not t.done()]
            if pending:  # let cancelled generates abort their engine requests
                await asyncio.wait(pending, timeout=10)
            self.queue.put_nowait(None) if not self.queue.full() else writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(writer, timeout=2)

    async def on_frame(self, text: str) -> None:
        frame = jsonrpc.parse_frame(text, max_batch=self.server.cfg.max_batch)
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
        task = asyncio.create_task(self._answer(frame, calls))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

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
        return await task

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
        params: Any = jsonrpc.bind_params(call)
        s = self.server
        if call.method == "server.info":
            self._need_backend_info()
            return s.info()
        if call.method == "rpc.discover":
            return openrpc_document()
        if call.method == "cancel":
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
            params = cast(GenerateRequestParams, jsonrpc.bind_params(call))
            if len(self.generates) >= self.server.cfg.max_inflight_per_connection:
                raise rpc.Overloaded(500, f"at most {self.server.cfg.max_inflight_per_connection} generates in flight per connection")
            self._refuse_if_draining()
            self.generates[rid] = cancelled
            registered = True

            async def emit(kind: str, payload: dict[str, Any]) -> None:
                await self.send(jsonrpc.notification(kind, EVENTS[kind](request_id=rid, **payload)))

            out = await self.server.runtime.generate(
                params, owner=self.owner, emit=emit, cancelled=cancelled, rid=f"{self.cid}-{uuid.uuid4().hex[:12]}"
            )
            error = out.error
        except rpc.RpcError as exc:
            error = exc
            out.finish_reason = "error"
        except asyncio.CancelledError:
            reason = getattr(asyncio.current_task(), "engine_failure", None)
            if reason is None and not self.closed:
                raise
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
