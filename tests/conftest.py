"""Shared fixtures: one real SGLang engine per test session, and the server on a real socket.

The engine (default model, CPU here) takes about 30 s to start on 2 cores, so every test that
needs it shares the session-scoped `backend`. All async tests run on one session-wide event
loop (pyproject: asyncio_default_*_loop_scope = "session"), the loop SGLang's tokenizer
manager binds to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os

import pytest
import pytest_asyncio

# Before anything imports sglang (and before a loop exists: sglang switches the policy to uvloop).
from runtime.sglang_env import prepare

prepare(os.environ.get("INFERENCE_DEVICE") or None)

from runtime.config import load_config  # noqa: E402


def test_config(**env: str):
    """A Config from explicit settings only: the developer's INFERENCE_* and .env do not leak in."""
    base = {}
    if os.environ.get("INFERENCE_MODEL_CACHE_DIR"):
        base["INFERENCE_MODEL_CACHE_DIR"] = os.environ["INFERENCE_MODEL_CACHE_DIR"]
    base.update(env)
    return load_config(env=base, dotenv_path=None)


test_config.__test__ = False  # a helper, not a test


@pytest.fixture(scope="session")
def cfg():
    return test_config()


@pytest_asyncio.fixture(scope="session")
async def backend(cfg):
    from runtime.engine import EmbeddedBackend

    b = EmbeddedBackend(cfg)
    await b.start()
    yield b
    await b.stop()


@contextlib.asynccontextmanager
async def running_server(cfg, backend):
    """uvicorn on a free loopback port, in this event loop, serving `backend`."""
    import uvicorn

    from runtime.app import build_app

    app = build_app(cfg, backend=backend)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           ws_max_size=cfg.max_frame_bytes, lifespan="on"))
    server.install_signal_handlers = lambda: None  # uvicorn >= 0.29 ignores this; capture_signals is patched below
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=30)


@pytest_asyncio.fixture(scope="session")
async def server(cfg, backend):
    async with running_server(cfg, backend) as (addr, app):
        yield addr, app


class RpcClient:
    """A small JSON-RPC client over a real WebSocket (the `websockets` library)."""

    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0

    async def send(self, obj) -> None:
        await self.ws.send(json.dumps(obj))

    async def recv(self, timeout: float = 120):
        return json.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def call(self, method: str, params=None, *, id=None, timeout: float = 120):
        """Send a request; return (response, notifications received before it, in order)."""
        if id is None:
            self.next_id += 1
            id = self.next_id
        msg = {"jsonrpc": "2.0", "method": method, "id": id}
        if params is not None:
            msg["params"] = params
        await self.send(msg)
        notes = []
        while True:
            frame = await self.recv(timeout)
            if isinstance(frame, dict) and "method" in frame:
                notes.append(frame)
                continue
            if isinstance(frame, dict) and frame.get("id") == id:
                return frame, notes
            notes.append(frame)


@contextlib.asynccontextmanager
async def connect(addr: str, **kwargs):
    import websockets

    async with websockets.connect(f"ws://{addr}/ws", max_size=None, **kwargs) as ws:
        yield RpcClient(ws)
