"""A small asyncio client of this runtime's JSON-RPC 2.0 WebSocket API (protocol/PROTOCOL.md).

    async with connect("ws://127.0.0.1:8000/ws", api_key=KEY) as client:
        session = await client.open_session(system_prompt="Be brief.", tools=[WEATHER])
        gen = await client.generate(session_id=session.session_id,
                                    messages=[{"role": "user", "content": "Weather in Paris?"}])
        async for event in gen:        # TextChunk | ReasoningChunk | FunctionCallRequest | StreamEnd
            ...
        result = await gen.result()    # GenerateResult, or the error table's RpcError subclass
        await client.close_session(session.session_id)

Routing. One background reader task (started on entering the client, or on its first use) reads
every frame and routes it:
- a response whose id is a pending high-level request of this client goes to that request;
- a notification whose `params.request_id` is a running `Generation` of this client goes to it;
- everything else (frames for ids sent with the raw API, batch replies, unknown methods, frames
  that are not JSON) is *unrouted*: kept in arrival order in an unbounded buffer that
  `recv_raw` and `call` consume and `unrouted` shows. Nothing is dropped.
So the raw API and the high-level API can share a connection without stealing each other's
frames, as long as they do not use the same ids: the client allocates ints from 1 up (`call`
included), so give raw frames string ids. When the connection closes, every pending request,
running Generation and `recv_raw` raises the websockets `ConnectionClosed`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any, Self, TypeAlias, TypeGuard, TypeVar

import websockets
from pydantic import BaseModel, ValidationError
from websockets.asyncio.client import ClientConnection
from websockets.datastructures import Headers

from . import models as m
from .errors import RpcError, invalid_params

Event: TypeAlias = m.TextChunk | m.ReasoningChunk | m.FunctionCallRequest | m.StreamEnd
RequestId: TypeAlias = str | int
EVENTS: dict[str, type[Event]] = {
    "text_chunk": m.TextChunk, "reasoning_chunk": m.ReasoningChunk,
    "function_call_request": m.FunctionCallRequest, "stream_end": m.StreamEnd,
}
_Item: TypeAlias = Event | dict[str, Any] | BaseException  # an event, the response, or the connection lost
_M = TypeVar("_M", bound=BaseModel)


def _is_id(value: object) -> TypeGuard[RequestId]:
    return isinstance(value, (str, int)) and not isinstance(value, bool)


def _checked(frame: dict[str, Any]) -> Any:
    """The response's result; a JSON-RPC error is raised as its class from the error table."""
    if "error" in frame:
        error = frame["error"]
        raise RpcError.from_error(error if isinstance(error, dict) else {"message": str(error)})
    return frame.get("result")


class Generation:
    """One `generate` in flight: an async iterator of its events (ending with the StreamEnd),
    `events` (every event that has arrived, iterated or not), `await result()`, `await cancel()`."""

    def __init__(self, client: Client, request_id: RequestId) -> None:
        self.client = client
        self.request_id = request_id
        self.events: list[Event] = []
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._ended = False  # the stream_end (or, without one, the response) was taken
        self._response: dict[str, Any] | None = None
        self._lost: BaseException | None = None

    @property
    def stream_end(self) -> m.StreamEnd | None:
        last = self.events[-1] if self.events else None
        return last if isinstance(last, m.StreamEnd) else None

    def __aiter__(self) -> Self:
        return self

    def _feed(self, item: _Item) -> None:  # called by the client's reader, in arrival order
        if isinstance(item, BaseModel):
            self.events.append(item)
        self._queue.put_nowait(item)

    async def __anext__(self) -> Event:
        if self._ended:
            raise StopAsyncIteration
        item = await self._take()
        if isinstance(item, dict):  # a response without a stream_end (e.g. a reused id, -32600)
            self._response, self._ended = item, True
            raise StopAsyncIteration
        self._ended = isinstance(item, m.StreamEnd)
        return item

    async def _take(self) -> Event | dict[str, Any]:
        if self._lost is not None:
            raise self._lost
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._lost = item
            raise item
        return item

    async def result(self, timeout: float | None = None) -> m.GenerateResult:
        """Drain the remaining events, then the response: the GenerateResult, or the typed
        RpcError (the stream_end that preceded it stays in `events`)."""
        async with asyncio.timeout(timeout):
            async for _ in self:
                pass
            while self._response is None:  # the protocol sends nothing between stream_end and it
                if isinstance(item := await self._take(), dict):
                    self._response = item
        return m.GenerateResult.model_validate(_checked(self._response))

    async def cancel(self) -> bool:
        """Send `cancel` for this request; True when it was running. Its events still end with
        a stream_end (finish_reason "cancelled") and result() still answers."""
        return await self.client.cancel(self.request_id)


class Client:
    """A JSON-RPC client on an open WebSocket; see the module docstring for how frames route."""

    def __init__(self, ws: ClientConnection, *, request_timeout: float | None = None) -> None:
        self.ws = ws
        self.request_timeout = request_timeout  # for the high-level requests; None: no limit
        self._ids = itertools.count(1)
        self._waiters: dict[RequestId, asyncio.Future[dict[str, Any]]] = {}
        self._generations: dict[RequestId, Generation] = {}
        self._unrouted: collections.deque[Any] = collections.deque()
        self._arrived = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self.closed: BaseException | None = None  # why the reader stopped, once it has

    async def __aenter__(self) -> Self:
        self._start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    @property
    def unrouted(self) -> list[Any]:
        """Frames no high-level request took and neither recv_raw nor call has read yet."""
        return list(self._unrouted)

    # ------------------------------------------------------------------ reader

    def _start(self) -> None:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read(), name="protocol.client reader")

    async def _read(self) -> None:
        try:
            while True:
                self._route(await self.ws.recv())
        except BaseException as exc:  # ConnectionClosed (normal or not), cancellation, a bug
            lost = exc if isinstance(exc, Exception) else ConnectionError("the client's reader stopped")
            self.closed = lost
            for future in self._waiters.values():
                if not future.done():
                    future.set_exception(lost)
            for gen in self._generations.values():
                gen._feed(lost)
            self._waiters.clear()
            self._generations.clear()
            self._arrived.set()
            if not isinstance(exc, websockets.ConnectionClosed):
                raise

    def _route(self, data: str | bytes) -> None:
        frame: Any = data
        if isinstance(data, str):
            with contextlib.suppress(ValueError):
                frame = json.loads(data)
        if isinstance(frame, dict) and "id" not in frame and isinstance(frame.get("method"), str):
            params = frame.get("params")
            rid = params.get("request_id") if isinstance(params, dict) else None
            gen = self._generations.get(rid) if _is_id(rid) else None
            model = EVENTS.get(frame["method"])
            if gen is not None and model is not None:
                with contextlib.suppress(ValidationError):  # a malformed event stays unrouted
                    gen._feed(model.model_validate(params))
                    return
        elif isinstance(frame, dict) and "method" not in frame and _is_id(frame.get("id")):
            rid = frame["id"]
            if (future := self._waiters.pop(rid, None)) is not None:
                if not future.done():
                    future.set_result(frame)
                return
            if (gen := self._generations.pop(rid, None)) is not None:
                gen._feed(frame)
                return
        self._unrouted.append(frame)
        self._arrived.set()

    # ------------------------------------------------------------------ raw API

    async def send_raw(self, message: Any) -> None:
        """Send one frame: a str as a text frame as is, bytes as a binary frame, anything else
        as JSON text."""
        self._start()
        await self.ws.send(message if isinstance(message, (str, bytes)) else json.dumps(message))

    async def recv_raw(self, timeout: float | None = 120) -> Any:
        """The next unrouted frame (decoded JSON; the str or bytes itself when not JSON).
        TimeoutError after `timeout` s; the ConnectionClosed once the connection is gone."""
        self._start()
        async with asyncio.timeout(timeout):
            while not self._unrouted:
                if self.closed is not None:
                    raise self.closed
                self._arrived.clear()
                await self._arrived.wait()
        return self._unrouted.popleft()

    async def call(self, method: str, params: Any = None, *, id: Any = None,
                   timeout: float | None = 120) -> tuple[dict[str, Any], list[Any]]:
        """Send a request (an allocated int id unless `id` is given) and read unrouted frames
        until its response; return (response, the frames read before it, in order). `timeout`
        applies to each frame. Errors are returned in the response, not raised."""
        if id is None:
            id = next(self._ids)
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": id}
        if params is not None:
            message["params"] = params
        await self.send_raw(message)
        before: list[Any] = []
        while True:
            frame = await self.recv_raw(timeout)
            if isinstance(frame, dict) and "method" not in frame and frame.get("id") == id:
                return frame, before
            before.append(frame)

    # ------------------------------------------------------------------ high-level API

    def _ready(self, rid: RequestId) -> None:
        self._start()
        if self.closed is not None:
            raise self.closed
        if rid in self._waiters or rid in self._generations:
            raise ValueError(f"request id {rid!r} is already in flight on this client")

    async def _send(self, method: str, params: dict[str, Any], rid: RequestId) -> None:
        await self.ws.send(json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": rid},
                                      separators=(",", ":"), ensure_ascii=False))

    async def _request(self, method: str, params: dict[str, Any], model: type[_M]) -> _M:
        rid = next(self._ids)
        self._ready(rid)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[rid] = future
        try:
            await self._send(method, params, rid)
            async with asyncio.timeout(self.request_timeout):
                frame = await future
        finally:
            self._waiters.pop(rid, None)
        return model.model_validate(_checked(frame))

    async def server_info(self) -> m.ServerInfoResult:
        return await self._request("server.info", {}, m.ServerInfoResult)

    async def discover(self) -> dict[str, Any]:
        """The OpenRPC document (`rpc.discover`)."""
        return (await self._request("rpc.discover", {}, m.DiscoverResult)).root

    async def open_session(self, *, system_prompt: str | None = None,
                           tools: list[Any] | None = None) -> m.SessionOpenResult:
        given = {k: v for k, v in (("system_prompt", system_prompt), ("tools", tools)) if v is not None}
        try:
            params = m.SessionOpenParams.model_validate(given)
        except ValidationError as exc:
            raise invalid_params(exc) from None
        return await self._request("session.open", params.model_dump(mode="json", exclude_unset=True),
                                   m.SessionOpenResult)

    async def close_session(self, session_id: str) -> None:
        await self._request("session.close", {"session_id": session_id}, m.SessionCloseResult)

    async def cancel(self, request_id: RequestId) -> bool:
        """Cancel a running generate of this connection; True when it was running."""
        return (await self._request("cancel", {"request_id": request_id}, m.CancelResult)).cancelled

    async def generate(self, *, id: RequestId | None = None, **params: Any) -> Generation:
        """Start a generate (params: GenerateRequestParams fields, validated here first, so a bad
        request raises InvalidParams without being sent) and return its Generation."""
        try:
            checked = m.GenerateRequestParams.model_validate(params)
        except ValidationError as exc:
            raise invalid_params(exc) from None
        if id is not None and not _is_id(id):
            raise ValueError("a generate id must be a string or an integer")
        rid = next(self._ids) if id is None else id
        self._ready(rid)
        gen = self._generations[rid] = Generation(self, rid)
        try:
            await self._send("generate", checked.model_dump(mode="json", exclude_unset=True), rid)
        except BaseException:
            self._generations.pop(rid, None)
            raise
        return gen


@contextlib.asynccontextmanager
async def connect(url: str, *, api_key: str | None = None, headers: Mapping[str, str] | None = None,
                  open_timeout: float | None = 10.0, request_timeout: float | None = None,
                  client_class: type[Client] = Client, **websockets_kwargs: Any) -> AsyncIterator[Client]:
    """Open `url` (ws://HOST:PORT/ws) and yield a started Client; closes it on exit.

    `api_key` sends `Authorization: Bearer <key>`; `headers` are added to any
    `additional_headers` given. The socket takes frames of any size (max_size=None) and sends
    no pings (ping_interval=None) unless `websockets_kwargs` say otherwise.
    """
    extra = Headers(websockets_kwargs.pop("additional_headers", None) or {})
    for name, value in (headers or {}).items():
        extra[name] = value
    if api_key is not None:
        extra["Authorization"] = f"Bearer {api_key}"
    websockets_kwargs.setdefault("max_size", None)
    websockets_kwargs.setdefault("ping_interval", None)
    async with (
        websockets.connect(url, additional_headers=extra or None, open_timeout=open_timeout,
                           **websockets_kwargs) as ws,
        client_class(ws, request_timeout=request_timeout) as client,
    ):
        yield client


__all__ = ["EVENTS", "Client", "Event", "Generation", "RequestId", "connect"]
