"""The sending half of a WebSocket connection: a queue bounded in frames and in bytes, one
writer task, and closing that never waits on a client that does not read.

A frame is queued without waiting; past `send_queue_frames` or `send_queue_bytes` the client is
let go (1008). A client that takes nothing for `send_timeout_s`, whether the frames wait in the
queue, in uvicorn, or in the socket's kernel buffer, is let go too: its transport is aborted,
its queue freed, its reader cancelled, so its slot is released whatever the transport does.
runtime.connection.Connection is the rest of the connection (reading and the calls).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import struct
import sys
import time
import uuid
from typing import Any

from starlette.websockets import WebSocket, WebSocketState

from protocol import jsonrpc
from runtime.server import Server

if sys.platform == "linux":
    import fcntl
    import termios

    _TIOCOUTQ: int | None = termios.TIOCOUTQ  # unsent + unacknowledged bytes of a socket
else:
    _TIOCOUTQ = None

log = logging.getLogger("runtime.app")

CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TIMEOUT_S = 5.0  # longest wait for a close frame to go out before the transport is dropped
FLUSH_TIMEOUT_S = 2.0  # longest wait, on a graceful close, for queued frames to go out first


def _buffered(transport: Any) -> int:
    """Bytes sent but not yet taken by the client: the transport's write buffer plus, on Linux,
    the kernel's send queue (a socket's buffer can hold megabytes). 0 when unknown."""
    if transport is None:
        return 0
    size = 0
    with contextlib.suppress(Exception):
        size += int(transport.get_write_buffer_size())
    if _TIOCOUTQ is not None:
        with contextlib.suppress(Exception):
            sock = transport.get_extra_info("socket")
            if sock is not None:
                raw = fcntl.ioctl(sock.fileno(), _TIOCOUTQ, b"\0\0\0\0")
                size += struct.unpack("i", raw)[0]
    return size


def _transport_of(ws: WebSocket) -> Any:
    """The asyncio transport under a Starlette WebSocket served by uvicorn (its ASGI send is the
    protocol's bound method), or None under another server."""
    for fn in (getattr(ws, "_send", None), getattr(ws, "_receive", None)):
        transport = getattr(getattr(fn, "__self__", None), "transport", None)
        if transport is not None and hasattr(transport, "abort"):
            return transport
    return None


class Outbox:
    """Sending and closing; the connection (a subclass) reads and answers calls."""

    def __init__(self, server: Server, ws: WebSocket):
        self.server = server
        self.ws = ws
        self.cid = uuid.uuid4().hex[:12]
        # Outgoing frames, bounded in frames (send_queue_frames) and bytes (send_queue_bytes).
        self.outbox: collections.deque[tuple[str, int]] = collections.deque()
        self.outbox_bytes = 0
        self._wakeup = asyncio.Event()
        self.closed = False
        self.close_code: int | None = None
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self._calls_done = asyncio.Event()

    def cancel_all(self) -> None:
        """Cancel what the connection runs (the subclass's generates)."""

    async def send(self, obj: Any) -> None:
        """Queue one frame; never waits. Past the queue's bounds the connection is let go."""
        if self.closed:
            return
        frame = jsonrpc.encode(obj)
        size = len(frame) if frame.isascii() else len(frame.encode("utf-8", "surrogatepass"))
        cfg = self.server.cfg
        if self.outbox and (len(self.outbox) >= cfg.send_queue_frames or self.outbox_bytes + size > cfg.send_queue_bytes):
            log.warning("connection %s: client is not reading (%d frames, %d bytes queued); closing",
                        self.cid, len(self.outbox), self.outbox_bytes)
            self.start_close(CLOSE_POLICY, "send queue full: client is not reading")
            return
        self.outbox.append((frame, size))
        self.outbox_bytes += size
        self._wakeup.set()

    async def writer(self) -> None:
        timeout = self.server.cfg.send_timeout_s
        transport = _transport_of(self.ws)
        stalled_since: float | None = None  # when the transport's buffer last stopped draining
        buffered = 0
        while True:
            if not self.outbox:
                if self.closed:  # flushed (a graceful close waits for this)
                    return
                self._wakeup.clear()
                size = _buffered(transport)
                if not size:
                    stalled_since = None
                    await self._wakeup.wait()
                    continue
                # Everything was handed to the transport but the client is not taking it: watch
                # its buffer; no progress for send_timeout_s and the client is let go.
                now = time.monotonic()
                if stalled_since is None or size < buffered:
                    stalled_since = now
                buffered = size
                if now - stalled_since >= timeout:
                    log.warning("connection %s: %d bytes not taken for %.1f s; dropping it", self.cid, size, timeout)
                    self.start_close(CLOSE_POLICY, "send timed out: client is not reading", abort=True)
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=min(1.0, timeout / 4))
                continue
            frame, size = self.outbox[0]
            try:
                # A client that takes nothing for send_timeout_s is let go, whatever the transport
                # does (uvicorn waits for a paused transport with no limit of its own).
                await asyncio.wait_for(self.ws.send_text(frame), timeout=timeout)
            except TimeoutError:
                log.warning("connection %s: no frame taken for %.1f s (%d frames, %d bytes queued); dropping it",
                            self.cid, timeout, len(self.outbox), self.outbox_bytes)
                self.start_close(CLOSE_POLICY, "send timed out: client is not reading", abort=True)
                return
            except Exception:
                self.start_close(None, "")
                return
            if self.outbox and self.outbox[0][0] is frame:
                self.outbox.popleft()
                self.outbox_bytes -= size

    def start_close(self, code: int | None, reason: str = "", *, abort: bool = False) -> asyncio.Task[None] | None:
        """Let the connection go, now: cancel its generates, free its queue, stop its writer, and
        (in a task, bounded) send the close frame, then end the reader, so the slot is released
        even when the client never reads or answers again. `code` None: the peer is gone already.
        `abort`: the transport is known to be stuck; do not try a close frame, drop it."""
        if self.closed:
            return self._closing
        self.closed = True
        self.close_code = code
        self.cancel_all()
        # A graceful close (shutdown, a bad frame) first lets the writer send what is queued
        # (bounded); a client that is not reading, or is gone, gets nothing more.
        flush = code is not None and code != CLOSE_POLICY and not abort
        if flush:
            self._wakeup.set()
        else:
            self._stop_writer()
        self._closing = asyncio.create_task(self._close_socket(code, reason, abort))
        return self._closing

    def _stop_writer(self) -> None:
        self._drop_outbox()
        if self._writer is not None and self._writer is not asyncio.current_task():
            self._writer.cancel()

    async def close(self, code: int, reason: str = "") -> None:
        task = self.start_close(code, reason)
        if task is not None and task is not asyncio.current_task():
            await asyncio.shield(task)

    async def _close_socket(self, code: int | None, reason: str, abort: bool) -> None:
        try:
            writer = self._writer
            if writer is not None and not writer.done() and writer is not asyncio.current_task():
                await asyncio.wait({writer}, timeout=FLUSH_TIMEOUT_S)  # the flush, if any
            self._stop_writer()
            if writer is not None and writer is not asyncio.current_task():
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.shield(writer), timeout=1)
            if code is not None and not abort and self.ws.application_state != WebSocketState.DISCONNECTED:
                try:
                    # A client that does not read may never take the close frame either: bounded.
                    await asyncio.wait_for(self.ws.close(code=code, reason=reason[:120]),
                                           timeout=min(CLOSE_TIMEOUT_S, self.server.cfg.send_timeout_s))
                except TimeoutError:
                    abort = True
                except Exception:
                    pass
            if abort:
                self._abort_transport()
        finally:
            # The reader may be parked in ws.receive() for a client that never sends again.
            if self._reader is not None and self._reader is not asyncio.current_task():
                self._reader.cancel()

    def _abort_transport(self) -> None:
        """Drop the TCP connection (RST): a transport paused on a client that does not read never
        drains, so uvicorn's close would wait forever and keep its buffers and the socket."""
        transport = _transport_of(self.ws)
        if transport is not None:
            with contextlib.suppress(Exception):
                transport.abort()

    def _drop_outbox(self) -> None:
        self.outbox.clear()
        self.outbox_bytes = 0
        self._wakeup.set()
        self._calls_done.set()
