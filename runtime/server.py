"""One server's shared state: config, the runtime, its connections, the engine's lifecycle.

Front ends (runtime.connection for /ws) register their connections here; the supervisor ends
what a dead engine was running on each of them and brings the engine back; SIGTERM drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from protocol.models import PROTOCOL_VERSION, RequestLimits, ServerInfoResult
from runtime.backends.base import Backend
from runtime.config import Config
from runtime.metrics import METRICS
from runtime.service import AgentRuntime

log = logging.getLogger("runtime.app")

CLOSE_GOING_AWAY = 1001
DRAIN_CLOSE_TIMEOUT_S = 8.0  # one wait for all connections' flush and close frame on SIGTERM
RESTART_FAILURES_UNHEALTHY = 3  # consecutive failed engine restarts that turn /health to 503


class Peer(Protocol):
    """What the server needs of a front end's connection."""

    generates: dict[Any, asyncio.Event]

    def busy(self) -> bool: ...

    def cancel_all(self) -> None: ...

    def fail_inflight(self, reason: str) -> None: ...

    async def close(self, code: int, reason: str = "") -> None: ...


class Server:
    """Shared state of one server: config, runtime, connections, lifecycle."""

    def __init__(self, cfg: Config, backend: Backend):
        self.cfg = cfg
        self.backend = backend
        self.runtime = AgentRuntime(cfg, backend)
        self.limits = RequestLimits(max_messages=cfg.max_messages, max_stop_sequences=cfg.max_stop_sequences,
                                    max_stop_chars=cfg.max_stop_chars)
        self.connections: set[Peer] = set()
        self.draining = False
        self.fatal: str | None = None  # why the engine could not start (for the log and the exit message)
        self.unhealthy: str | None = None  # set: /health answers 503 with this (liveness)
        self.restart_failures = 0  # consecutive failed engine restarts
        self.supervise_interval_s = 1.0
        self.restart_backoff_s = 5.0
        self.start_task: asyncio.Task[None] | None = None
        self.supervisor: asyncio.Task[None] | None = None
        self.on_fatal: Callable[[str], None] | None = None
        self._owns_backend_start = False

    # ------------------------------------------------------------------ lifecycle
    async def startup(self) -> None:
        if self.backend.is_ready():
            self._log_ready()
            _freeze_startup_objects()
            self.supervisor = asyncio.create_task(self._supervise())
            return
        self._owns_backend_start = True
        self.start_task = asyncio.create_task(self._start_backend())

    async def _start_backend(self) -> None:
        try:
            await self.backend.start()
        except Exception as exc:
            self.fatal = f"{type(exc).__name__}: {exc}"
            log.error("engine failed to start: %s", self.fatal)
            if self.on_fatal is not None:
                self.on_fatal(self.fatal)
            return
        METRICS.engine_ready.set(1)
        self._log_ready()
        _freeze_startup_objects()
        self.supervisor = asyncio.create_task(self._supervise())

    def _log_ready(self) -> None:
        i = self.backend.info
        log.info(
            "ready: model=%s backend=%s device=%s dtype=%s attention=%s kv_capacity_tokens=%d context_length=%d radix_cache=%s",
            i.model, i.name, i.device, i.dtype, i.attention_backend, i.kv_capacity_tokens, i.context_length, i.radix_cache,
        )

    async def _supervise(self) -> None:
        """Notice a dead engine, end what it was running, bring it back."""
        if not self.backend.supervised():
            return
        while True:
            await asyncio.sleep(self.supervise_interval_s)
            try:
                alive = self.backend.check_alive()
            except Exception:  # the supervisor must outlive a failing check, or deaths go unnoticed
                log.exception("engine liveness check failed; treating the engine as dead")
                alive = False
            if alive:
                continue
            METRICS.engine_ready.set(0)
            for conn in list(self.connections):
                conn.fail_inflight("the engine process died")
            log.warning("restarting the engine")
            try:
                await self.backend.restart()
            except Exception as exc:
                self.restart_failures += 1
                log.error("engine restart failed (%d in a row): %s; retrying in %.0f s",
                          self.restart_failures, exc, self.restart_backoff_s)
                if self.restart_failures >= RESTART_FAILURES_UNHEALTHY and self.unhealthy is None:
                    self.unhealthy = f"the engine failed to restart {self.restart_failures} times in a row"
                    log.error("unhealthy: %s", self.unhealthy)
                await asyncio.sleep(self.restart_backoff_s)
                continue
            self.restart_failures = 0
            self.unhealthy = None
            METRICS.engine_restarts.inc()
            METRICS.engine_ready.set(1)
            self._log_ready()

    async def shutdown(self) -> None:
        for task in (self.supervisor, self.start_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for conn in list(self.connections):
            conn.cancel_all()
        if self._owns_backend_start:
            await self.backend.stop()

    async def drain(self, grace_s: float) -> None:
        """SIGTERM: refuse new work, let streams finish for `grace_s`, then cancel the rest."""
        self.draining = True
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(c.busy() for c in self.connections):
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.cancel_all()
        # Until every call has queued its answer (a cancelled generate's stream_end and response).
        while any(c.busy() for c in self.connections) and time.monotonic() < deadline + 5:
            await asyncio.sleep(0.05)
        # Concurrently, with one bounded wait: a client that does not read must not hold up the others.
        closes = [asyncio.ensure_future(conn.close(CLOSE_GOING_AWAY, "server shutting down")) for conn in list(self.connections)]
        if closes:
            _, late = await asyncio.wait(closes, timeout=DRAIN_CLOSE_TIMEOUT_S)
            for task in late:
                task.cancel()
            if late:
                log.warning("drain: %d connections did not close within %.0f s", len(late), DRAIN_CLOSE_TIMEOUT_S)

    def public_start_failure(self) -> str:
        """What /ready says when the engine could not start: which backend, never the
        exception's text (that is in the log: it may hold paths, hosts or internal details)."""
        c = self.cfg
        where = f" at {', '.join(c.backend_urls)}" if c.backend in ("sglang", "openai") and c.backend_urls else ""
        return f"the engine failed to start (backend {c.backend}{where}); see the server log"

    # ------------------------------------------------------------------ handshake
    def owner_for(self, headers: Any) -> str | None:
        """The key identity of a request's headers, '' without keys, None if refused."""
        if not self.cfg.api_key:
            return ""
        header = headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        for key in self.cfg.api_key.split(","):
            key = key.strip()
            if key and hmac.compare_digest(token.strip().encode(), key.encode()):
                return hashlib.sha256(key.encode()).hexdigest()[:16]
        return None

    def info(self) -> ServerInfoResult:
        i = self.backend.info
        c = self.cfg
        return ServerInfoResult(
            protocol_version=PROTOCOL_VERSION,
            model=i.model,
            backend=i.name,
            context_length=i.context_length,
            limits={
                "max_frame_bytes": c.max_frame_bytes,
                "max_batch": c.max_batch,
                "max_inflight_per_connection": c.max_inflight_per_connection,
                "max_connections": c.max_connections,
                "max_sessions": c.max_sessions,
                "max_sessions_per_key": c.max_sessions_per_key,
                "session_ttl_s": c.session_ttl_s,
                "max_tokens_cap": c.max_tokens_cap,
                "default_max_tokens": c.default_max_tokens,
                "max_queue": c.max_queue,
                "max_id_chars": c.max_id_chars,
                "max_messages": c.max_messages,
                "max_stop_sequences": c.max_stop_sequences,
                "max_stop_chars": c.max_stop_chars,
                "max_tools_bytes": c.max_tools_bytes,
                "max_schema_branches": c.max_schema_branches,
                "send_queue_frames": c.send_queue_frames,
                "send_queue_bytes": c.send_queue_bytes,
                "kv_capacity_tokens": i.kv_capacity_tokens,
            },
        )


def _freeze_startup_objects() -> None:
    """Move everything alive once the engine has started (the engine's and every import's
    objects, millions of them) out of the garbage collector's generations: a request that
    allocates many objects (a large frame) would otherwise start a full collection over all of
    them, a stall of hundreds of milliseconds on the event loop."""
    gc.collect()
    gc.freeze()
