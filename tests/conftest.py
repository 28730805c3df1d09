"""Shared fixtures: one real SGLang engine per test session, the scripted fake backend, and the
server on a real socket over either.

The engine (default model, CPU here) takes about 30 s to start on 2 cores, so every test that
needs it shares the session-scoped `backend` and carries the `engine` marker
(`./launch.sh test -m "not engine"` runs the rest, on `fake_server`, in seconds). All async tests run on one session-wide event
loop (pyproject: asyncio_default_*_loop_scope = "session"), the loop SGLang's tokenizer
manager binds to.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest
import pytest_asyncio

# Before anything imports sglang (and before a loop exists: sglang switches the policy to uvloop).
from runtime.sglang_adapter import prepare

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
    # SGLang's own metrics on (off by default on CPU) so that the engine tests see them in /metrics.
    return test_config(INFERENCE_ENGINE_METRICS="on")


@pytest_asyncio.fixture(scope="session")
async def backend(cfg):
    from runtime.backends.embedded import EmbeddedBackend

    b = EmbeddedBackend(cfg)
    await b.start()
    _STARTED_ENGINES.append(b)
    yield b
    _STARTED_ENGINES.remove(b)
    await b.stop()


_STARTED_ENGINES: list = []  # the session's real engine, once a test has started it
LEFT_RUNNING_GRACE_S = 10


@pytest_asyncio.fixture(autouse=True)
async def _no_request_outlives_its_test(request):
    """After each test, the shared real engine runs no request of it: a request a test (or the
    runtime under test, for a client that went away) left behind would decode on into the next
    tests. A request still finishing its abort gets LEFT_RUNNING_GRACE_S."""
    yield
    for b in _STARTED_ENGINES:
        left = 0
        for _ in range(LEFT_RUNNING_GRACE_S * 10):
            left = await b.engine_requests() or 0
            if not left:
                break
            await asyncio.sleep(0.1)
        if left:
            pytest.fail(f"{left} engine request(s) still running or waiting {LEFT_RUNNING_GRACE_S} s after {request.node.nodeid}")


@pytest_asyncio.fixture(scope="session")
async def fake_backend():
    """The scripted fake backend (runtime.backends.fake), started once; see `fake`."""
    from runtime.backends.fake import FakeBackend

    b = FakeBackend()
    await b.start()
    yield b
    await b.stop()


@pytest.fixture
def fake(fake_backend):
    """The shared fake backend, reset to its defaults for this test (replies, speed, liveness)."""
    from runtime.backends.fake import DEFAULT_REPLY

    def reset():
        fake_backend.replies.clear()
        fake_backend.reply = lambda _request, _prompt: DEFAULT_REPLY
        fake_backend.token_delay_s = 0.0
        fake_backend._alive = True

    reset()
    yield fake_backend
    reset()


@pytest_asyncio.fixture(scope="session")
async def fake_server(cfg, fake_backend):
    """This runtime's server on a real loopback socket, on the fake backend: for protocol and
    socket tests that do not need a model (milliseconds instead of an engine start)."""
    async with running_server(cfg, fake_backend) as (addr, app):
        yield addr, app


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


from protocol.client import Client  # noqa: E402


class RpcClient(Client):
    """protocol.client.Client with the short raw names the tests use: `send(obj)`, `recv(timeout)`,
    `call(method, params, id=, timeout=)` -> (response, frames before it), and `ws`."""

    send = Client.send_raw
    recv = Client.recv_raw


@contextlib.asynccontextmanager
async def connect(addr: str, **kwargs):
    """An RpcClient on ws://`addr`/ws; kwargs go to websockets.connect (additional_headers, origin, ...)."""
    from protocol.client import connect as client_connect

    kwargs.setdefault("ping_interval", 20)  # what websockets.connect did here before
    async with client_connect(f"ws://{addr}/ws", client_class=RpcClient, **kwargs) as c:
        yield c


class StallProbe:
    """A second connection that times `server.info` round trips while something else runs: the
    event loop's worst stall as a client sees it. Every hostile-input test runs one."""

    def __init__(self, client: RpcClient, interval_s: float):
        self.client = client
        self.interval_s = interval_s
        self.round_trips_ms: list[float] = []
        self.unanswered = 0

    @property
    def worst_ms(self) -> float:
        return max(self.round_trips_ms, default=0.0)

    async def run(self) -> None:
        import time

        while True:
            t0 = time.perf_counter()
            try:
                reply, _ = await self.client.call("server.info", {}, timeout=30)
            except TimeoutError:
                self.unanswered += 1
                continue
            self.round_trips_ms.append((time.perf_counter() - t0) * 1000)
            if "result" not in reply:
                self.unanswered += 1
            await asyncio.sleep(self.interval_s)


@contextlib.asynccontextmanager
async def stall_probe(addr: str, *, interval_s: float = 0.02, **kwargs):
    """`async with stall_probe(addr) as probe: <hostile traffic>`; then read `probe.worst_ms`
    (the issue's bar: under 250 ms) and `probe.round_trips_ms` (at least one completed)."""
    async with connect(addr, **kwargs) as client:
        probe = StallProbe(client, interval_s)
        task = asyncio.create_task(probe.run())
        try:
            await asyncio.sleep(interval_s)
            yield probe
        finally:
            # let a round trip that started during the hostile request finish and be counted
            deadline = asyncio.get_running_loop().time() + 30
            count = len(probe.round_trips_ms)
            while len(probe.round_trips_ms) == count and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def plugin_report_around_request(backend, key: str, new_tokens: int = 8,
                                       prompt: str = "Count from one to ten:") -> tuple[dict, dict]:
    """What the SGLang plugin reports under `key` from the engine's scheduler process, before and
    after one greedy request of `new_tokens` tokens (`new_tokens - 1` decode steps)."""
    from runtime.backends.embedded import _plugin_report

    tm = backend._engine.tokenizer_manager
    before = (await _plugin_report(tm))[key]
    ids = backend.tokenizer.encode(prompt, add_special_tokens=False)
    await backend._engine.async_generate(input_ids=ids, sampling_params={"temperature": 0.0, "max_new_tokens": new_tokens,
                                                                         "ignore_eos": True})
    return before, (await _plugin_report(tm))[key]
