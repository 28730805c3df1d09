"""The Starlette app: /health, /ready, /metrics, the JSON-RPC WebSocket at /ws and the
OpenAI-compatible HTTP API under /v1 (runtime.openai_api, runtime.openai_responses), on the
same server state.

The handshake (API key, Origin, connection limit, draining) is decided here; the connection
itself is runtime.connection, the shared state runtime.server.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from runtime.backends.base import Backend
from runtime.config import Config
from runtime.connection import Connection
from runtime.metrics import METRICS
from runtime.openai_api import openai_routes
from runtime.openai_responses import responses_routes
from runtime.outbox import CLOSE_POLICY
from runtime.server import Server


def build_app(cfg: Config, *, backend: Backend | None = None) -> Starlette:
    """The ASGI app. Without `backend`, the one cfg.backend names is created and started in
    the lifespan (in the background, so /health answers while the engine loads)."""
    if backend is None:
        from runtime.backends import make_backend  # the registry imports only the chosen backend

        backend = make_backend(cfg)
    server = Server(cfg, backend)

    async def health(_: Request) -> Response:
        # Liveness: 503 once the engine cannot be brought back (restarts keep failing), so an
        # orchestrator restarts the process. A short reason only; the details are in the log.
        if server.unhealthy:
            return JSONResponse({"status": "unhealthy", "reason": server.unhealthy}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def ready(_: Request) -> Response:
        # Never the exception's text (it goes to the log): only what failed, in the operator's terms.
        if server.fatal:
            return JSONResponse({"ready": False, "error": server.public_start_failure()}, status_code=503)
        ok = server.backend.is_ready() and not server.draining
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def metrics(_: Request) -> Response:
        # SGLang's own metrics (read from its multiprocess files) are rendered off the loop.
        body = await asyncio.to_thread(METRICS.render) if METRICS.multiprocess_dir else METRICS.render()
        return PlainTextResponse(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def ws_endpoint(ws: WebSocket) -> None:
        owner = server.owner_for(ws.headers)
        if owner is None:
            await _deny(ws, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
            return
        origin = ws.headers.get("origin")
        if origin is not None and not origin_allowed(origin, ws.headers.get("host"), cfg.allowed_origins):
            await _deny(ws, 403, f"origin {origin[:200]!r} is not allowed: set INFERENCE_ALLOWED_ORIGINS")
            return
        if len(server.connections) >= cfg.max_connections:
            await _deny(ws, 503, "too many connections")
            return
        if server.draining:
            await _deny(ws, 503, "server shutting down")
            return
        await ws.accept()
        conn = Connection(server, ws, owner)
        server.connections.add(conn)
        METRICS.connections_open.set(len(server.connections))
        try:
            await conn.run()
        finally:
            server.connections.discard(conn)
            METRICS.connections_open.set(len(server.connections))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await server.startup()
        try:
            yield
        finally:
            await server.shutdown()

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/ready", ready),
            Route("/metrics", metrics),
            WebSocketRoute("/ws", ws_endpoint),
            *openai_routes(server),
            *responses_routes(server),
        ],
        lifespan=lifespan,
    )
    app.state.server = server
    return app


_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


def _host_port(host: str | None, port: int | None, scheme: str) -> tuple[str, int | None] | None:
    if not host:
        return None
    return host.lower().rstrip("."), port if port is not None else _DEFAULT_PORTS.get(scheme)


def origin_allowed(origin: str, host_header: str | None, allowed: tuple[str, ...]) -> bool:
    """A browser's handshake (it always sends Origin) is accepted from an allow-listed origin or
    from the server's own origin (same host and port as the Host header); from any other page it
    is refused, so a web page cannot drive the runtime (cross-site WebSocket hijacking). Clients
    that send no Origin (SDKs, scripts) are not affected."""
    origin = origin.strip().rstrip("/")
    if origin in allowed:
        return True
    try:
        o = urlsplit(origin)
        mine = _host_port(o.hostname, o.port, o.scheme.lower())
        h = urlsplit(f"//{host_header}") if host_header else None
        # The Host header has no scheme: its default port is the origin's scheme's (http -> 80).
        theirs = _host_port(h.hostname, h.port, o.scheme.lower()) if h is not None else None
    except ValueError:
        return False
    return o.scheme.lower() in _DEFAULT_PORTS and mine is not None and mine == theirs


async def _deny(ws: WebSocket, status: int, message: str) -> None:
    """Refuse the handshake with an HTTP status (no upgrade) where the server supports it."""
    try:
        await ws.send_denial_response(JSONResponse({"error": message}, status_code=status))
    except Exception:  # no denial-response extension: a plain close before accept is a 403
        await ws.close(code=CLOSE_POLICY)
