"""The Starlette app: /health, /ready, /metrics and the JSON-RPC WebSocket at /ws.

The handshake (API key, Origin, connection limit, draining) is decided here; the connection
itself is runtime.connection, the shared state runtime.server.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from runtime.backends.base import Backend
from runtime.config import Config
from runtime.connection import CLOSE_POLICY, Connection
from runtime.metrics import METRICS
from runtime.server import Server


def build_app(cfg: Config, *, backend: Backend | None = None) -> Starlette:
    """The ASGI app. Without `backend`, the one cfg.backend names is created and started in
    the lifespan (in the background, so /health answers while the engine loads)."""
    if backend is None:
        from runtime.backends import make_backend  # the registry imports only the chosen backend

        backend = make_backend(cfg)
    server = Server(cfg, backend)

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(_: Request) -> Response:
        if server.fatal:
            return JSONResponse({"ready": False, "error": server.fatal}, status_code=503)
        ok = server.backend.is_ready() and not server.draining
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def metrics(_: Request) -> Response:
        return PlainTextResponse(METRICS.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def ws_endpoint(ws: WebSocket) -> None:
        owner = server.owner_for(ws.headers)
        if owner is None:
            await _deny(ws, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
            return
        origin = ws.headers.get("origin")
        if cfg.allowed_origins and origin is not None and origin.rstrip("/") not in cfg.allowed_origins:
            await _deny(ws, 403, f"origin {origin!r} is not allowed")
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
        ],
        lifespan=lifespan,
    )
    app.state.server = server
    return app


async def _deny(ws: WebSocket, status: int, message: str) -> None:
    """Refuse the handshake with an HTTP status (no upgrade) where the server supports it."""
    try:
        await ws.send_denial_response(JSONResponse({"error": message}, status_code=status))
    except Exception:  # no denial-response extension: a plain close before accept is a 403
        await ws.close(code=CLOSE_POLICY)
