"""Hostile clients against the real server on a real socket (fake backend): no stall, no
unbounded memory, no orphaned turn, no lost answer.

Every hostile-input test runs inside `stall_probe` (a second connection timing server.info round
trips) and checks the worst round trip, that round trips completed, and that every request id it
sent got its answer. Figures are printed (`pytest -s` shows them).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import os
import socket
import struct
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from conftest import connect, running_server, stall_probe
from runtime.backends.fake import FakeBackend

SAY_HI = [{"role": "user", "content": "Say hi."}]
STALL_MS = 250


def check_probe(probe, label: str) -> None:
    print(f"\n[{label}] probe: {len(probe.round_trips_ms)} round trips, worst {probe.worst_ms:.1f} ms")
    assert probe.round_trips_ms, "no probe round trip completed"
    assert probe.unanswered == 0
    assert probe.worst_ms < STALL_MS, f"the event loop stalled {probe.worst_ms:.0f} ms ({label})"


# --------------------------------------------------------------------------- raw WebSocket client


def raw_ws(addr: str, *, rcvbuf: int | None = None, origin: str | None = None) -> socket.socket:
    """A blocking socket that did the WebSocket handshake (call it in a thread: the server runs
    on the test's event loop). `rcvbuf`: SO_RCVBUF set before connecting (a slow reader)."""
    host, port = addr.split(":")
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(10)
    s.connect((host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    extra = f"Origin: {origin}\r\n" if origin else ""
    s.sendall((f"GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)  # byte by byte: nothing past the handshake is consumed
        if not chunk:
            raise ConnectionError("closed during the handshake")
        head += chunk
    assert b" 101 " in head.split(b"\r\n")[0], head
    return s


def ws_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A masked client frame (a zero masking key: the payload goes as is)."""
    n = len(payload)
    if n < 126:
        length = bytes([0x80 | n])
    elif n < 65536:
        length = bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        length = bytes([0x80 | 127]) + struct.pack("!Q", n)
    return bytes([0x80 | opcode]) + length + b"\0\0\0\0" + payload


def close_frame(code: int = 1000) -> bytes:
    return ws_frame(struct.pack("!H", code), opcode=0x8)


async def metric(http: httpx.AsyncClient, addr: str, name: str) -> float:
    """A sample of /metrics. `http` is made before the probe starts: building an httpx client
    loads certificates, which blocks the test's event loop (the server's) for tens of ms."""
    text = (await http.get(f"http://{addr}/metrics", timeout=10)).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


async def read_until_answered(c, ids: set, *, timeout: float = 30) -> tuple[dict, list]:
    """Frames until every id in `ids` has a response: (responses by id, every frame in order)."""
    answers: dict = {}
    frames: list = []
    while not ids <= answers.keys():
        frame = await c.recv(timeout=timeout)
        for item in frame if isinstance(frame, list) else [frame]:
            frames.append(item)
            if "method" not in item:
                assert item["id"] not in answers, f"two answers for {item['id']!r}"
                answers[item["id"]] = item
    return answers, frames


# --------------------------------------------------------------------------- 1. long ids


async def test_long_request_ids_are_refused_with_id_null(cfg, fake):
    async with running_server(cfg, fake) as (addr, _):
        limit = cfg.max_id_chars
        async with stall_probe(addr) as probe, connect(addr, max_size=None) as c:
            huge = "x" * 200_000
            before = fake.requests[:]
            # generate with a 200 KB id: one small -32600, id null, naming the limit; never run.
            await c.send({"jsonrpc": "2.0", "id": huge, "method": "generate",
                          "params": {"messages": SAY_HI, "max_tokens": 64, "tool_choice": "none"}})
            frame = await c.recv(timeout=10)
            assert frame["id"] is None and frame["error"]["code"] == -32600
            assert frame["error"]["data"]["max_id_chars"] == limit and str(limit) in frame["error"]["data"]["reason"]
            assert len(json.dumps(frame)) < 1000
            # In a batch: that element only; the others are answered with their ids.
            await c.send([{"jsonrpc": "2.0", "id": huge, "method": "server.info"},
                          {"jsonrpc": "2.0", "id": "ok-1", "method": "server.info"}])
            batch = await c.recv(timeout=10)
            assert [b["id"] for b in batch] == [None, "ok-1"] and batch[0]["error"]["code"] == -32600
            # A huge integer id is capped the same way.
            await c.send(f'{{"jsonrpc":"2.0","method":"server.info","id":{10 ** 1000}}}')
            r = await c.recv(timeout=10)
            assert r["id"] is None and r["error"]["code"] == -32600
            # cancel's request_id likewise (-32602 naming the limit; its own id is fine).
            r, _ = await c.call("cancel", {"request_id": huge}, id="cancel-1")
            assert r["id"] == "cancel-1" and r["error"]["code"] == -32602
            assert r["error"]["data"]["errors"][0]["field"] == "request_id" and str(limit) in r["error"]["message"]
            # An id at the limit is served, and echoed in every notification.
            at_limit = "y" * limit
            r, notes = await c.call("generate", {"messages": SAY_HI, "max_tokens": 8, "tool_choice": "none"}, id=at_limit)
            assert r["id"] == at_limit and "result" in r
            assert [n["params"]["request_id"] for n in notes if n["method"] == "stream_end"] == [at_limit]
            assert len(fake.requests) == len(before) + 1  # only the at-limit generate reached the engine
        check_probe(probe, "200 KB id")


# --------------------------------------------------------------------------- 2. flood, then silence


def _flood(addr: str, frame: bytes, count: int, rcvbuf: int) -> tuple[socket.socket, int]:
    s = raw_ws(addr, rcvbuf=rcvbuf)
    s.settimeout(2)
    sent = 0
    for _ in range(count):
        try:
            s.sendall(frame)
        except OSError:  # the server stopped reading, or dropped us: stop, and stay silent
            break
        sent += 1
    return s, sent


@pytest.mark.parametrize("frames", [1100, 1], ids=["flood", "one-big-reply"])
async def test_discover_flood_then_silent_client_is_let_go(cfg, fake, frames):
    # send_timeout_s short so the test is quick; the bound holds for any value.
    tight = cfg.replace(send_timeout_s=1.0)
    async with running_server(tight, fake) as (addr, app):
        server = app.state.server
        batch = json.dumps([{"jsonrpc": "2.0", "id": i, "method": "rpc.discover"} for i in range(64)]).encode()
        gc.collect()
        rss0 = psutil.Process().memory_info().rss
        async with httpx.AsyncClient() as http, stall_probe(addr) as probe:
            base = await metric(http, addr, "agent_runtime_connections_open")  # the probe itself
            t0 = time.monotonic()
            sock, sent = await asyncio.to_thread(_flood, addr, ws_frame(batch), frames, 4096)
            try:
                # The client now never reads and never sends. It is let go within bounded time.
                peak_rss = psutil.Process().memory_info().rss
                while await metric(http, addr, "agent_runtime_connections_open") > base:
                    assert time.monotonic() - t0 < 30, "the silent client was not let go within 30 s"
                    peak_rss = max(peak_rss, psutil.Process().memory_info().rss)
                    await asyncio.sleep(0.1)
                let_go_s = time.monotonic() - t0
                assert len(server.connections) == base
                # A new client gets in and is served.
                async with connect(addr) as c:
                    r, _ = await c.call("server.info", {})
                    assert "result" in r
            finally:
                sock.close()
        gc.collect()
        growth = psutil.Process().memory_info().rss - rss0
        print(f"\n[discover x64, {frames} frames] sent {sent} frames, let go after {let_go_s:.1f} s, "
              f"RSS growth {growth / 2**20:.1f} MiB (peak +{(peak_rss - rss0) / 2**20:.1f} MiB)")
        check_probe(probe, f"discover flood {frames}")
        assert growth < 100 * 2**20, f"RSS grew {growth / 2**20:.0f} MiB"


async def test_silent_clients_release_their_slots(cfg, fake):
    # Audit H1: every slot taken by a client that asked for a big reply and went silent; a new
    # client must get in once they are let go (503 until then, never forever).
    import websockets

    tight = cfg.replace(send_timeout_s=1.0, max_connections=5)
    batch = ws_frame(json.dumps([{"jsonrpc": "2.0", "id": i, "method": "rpc.discover"} for i in range(64)]).encode())
    async with running_server(tight, fake) as (addr, app):
        async with stall_probe(addr) as probe:  # takes one slot
            socks = [(await asyncio.to_thread(_flood, addr, batch, 1, 4096))[0] for _ in range(4)]
            try:
                t0 = time.monotonic()
                while True:
                    try:
                        async with websockets.connect(f"ws://{addr}/ws"):
                            break
                    except websockets.InvalidStatus as exc:
                        assert exc.response.status_code == 503
                    assert time.monotonic() - t0 < 30, "the silent clients kept their slots"
                    await asyncio.sleep(0.2)
                print(f"\n[slots] 4 silent clients let go; a new client got in after {time.monotonic() - t0:.1f} s")
            finally:
                for sock in socks:
                    sock.close()
        check_probe(probe, "silent clients holding every slot")
        for _ in range(100):  # the probe's own connection, closing
            if not app.state.server.connections:
                break
            await asyncio.sleep(0.05)
        assert not app.state.server.connections


# --------------------------------------------------------------------------- 3. generate + close in one buffer


def _generate_then_close(addr: str, frame: dict) -> None:
    s = raw_ws(addr)
    s.sendall(ws_frame(json.dumps(frame).encode()) + close_frame())
    try:
        s.recv(4096)  # the server's close reply (or nothing)
    except OSError:
        pass
    s.close()


async def test_generate_then_close_in_one_buffer_runs_nothing(cfg, fake):
    fake.reply = lambda _request, _prompt: "word " * 200
    fake.token_delay_s = 0.01  # an orphan would run for seconds
    async with running_server(cfg, fake) as (addr, _):
        async with connect(addr) as c:
            opened, _ = await c.call("session.open", {"system_prompt": "You are terse."})
            sid = opened["result"]["session_id"]
        async with httpx.AsyncClient() as http, stall_probe(addr) as probe:
            seen = len(fake.requests)
            inflight = await metric(http, addr, "agent_runtime_generates_inflight")
            await asyncio.to_thread(_generate_then_close, addr, {
                "jsonrpc": "2.0", "id": 1, "method": "generate",
                "params": {"session_id": sid, "messages": SAY_HI, "max_tokens": 256, "tool_choice": "none"}})
            deadline = time.monotonic() + 1.0
            while (await fake.engine_requests() or await metric(http, addr, "agent_runtime_generates_inflight") > inflight):
                assert time.monotonic() < deadline, "a generate kept running for a closed connection"
                await asyncio.sleep(0.02)
            assert len(fake.requests) == seen, "the engine was given a generate of a closed connection"
            fake.reply = lambda _request, _prompt: "ok"
            async with connect(addr) as c:  # the session is not busy, and has no unseen turn
                r, _ = await c.call("generate", {"session_id": sid, "messages": SAY_HI, "max_tokens": 8,
                                                 "tool_choice": "none"}, id="next")
                assert "result" in r, r
                assert "word" not in fake.tokenizer.decode(fake.requests[-1].input_ids)
        check_probe(probe, "generate + close in one buffer")


# --------------------------------------------------------------------------- 4. engine death races requests


def generate_frame(rid, max_tokens: int = 24) -> dict:
    return {"jsonrpc": "2.0", "id": rid, "method": "generate",
            "params": {"messages": SAY_HI, "max_tokens": max_tokens, "tool_choice": "none"}}


def check_generate_answers(frames: list, generate_ids: set, other_ids: set) -> None:
    """Every id exactly one response; every generate exactly one stream_end, before it."""
    responses = [f for f in frames if "method" not in f]
    assert sorted(map(str, (r["id"] for r in responses))) == sorted(map(str, generate_ids | other_ids))
    for rid in generate_ids:
        ends = [i for i, f in enumerate(frames) if f.get("method") == "stream_end" and f["params"]["request_id"] == rid]
        (answer,) = [i for i, f in enumerate(frames) if "method" not in f and f["id"] == rid]
        assert len(ends) == 1 and ends[0] < answer, rid
        end = frames[ends[0]]["params"]
        assert ("error" in end) == (end["finish_reason"] == "error"), end
        if "error" in frames[answer]:
            assert end["error"] == frames[answer]["error"]


async def test_engine_death_racing_requests_loses_no_answer(cfg):
    backend = FakeBackend(token_delay_s=0.01)
    await backend.start()
    try:
        async with running_server(cfg, backend) as (addr, app):
            server = app.state.server
            server.supervise_interval_s = 0.2
            async with stall_probe(addr) as probe:
                others = set(server.connections)
                async with connect(addr) as c:
                    (conn,) = set(server.connections) - others
                    # (a) Deterministic: the engine dies and fail_inflight runs before the calls of a
                    # frame have started (the race of audit M7), single and batched.
                    loop = asyncio.get_running_loop()

                    def kill_now() -> None:
                        backend.kill()
                        conn.fail_inflight("the engine process died")

                    original = conn._call_task

                    async def racing(call):
                        loop.call_soon(kill_now)  # runs before the call's task takes its first step
                        return await original(call)

                    conn._call_task = racing
                    await c.send(generate_frame("solo"))
                    await c.send([generate_frame("b1"), {"jsonrpc": "2.0", "id": "b-info", "method": "server.info"},
                                  generate_frame("b2")])
                    _, frames = await read_until_answered(c, {"solo", "b1", "b-info", "b2"})
                    check_generate_answers(frames, {"solo", "b1", "b2"}, {"b-info"})
                    del conn._call_task
                    # (b) A retry storm while the engine dies and comes back: everything answered.
                    for _ in range(100):
                        if backend.is_ready():
                            break
                        await asyncio.sleep(0.05)
                    gen_ids: set = set()
                    other_ids: set = set()
                    for i in range(6):
                        gen_ids.add(f"g{i}")
                        await c.send(generate_frame(f"g{i}"))
                    await c.send([generate_frame("bb1"), generate_frame("bb2"), {"jsonrpc": "2.0", "id": "bb-info", "method": "server.info"}])
                    gen_ids |= {"bb1", "bb2"}
                    other_ids.add("bb-info")
                    await asyncio.sleep(0.05)
                    backend.kill()
                    for i in range(20):  # requests keep coming while the engine is down
                        gen_ids.add(f"late{i}")
                        await c.send(generate_frame(f"late{i}", max_tokens=4))
                        if i % 5 == 0:
                            await c.send([generate_frame(f"lb{i}", max_tokens=4), {"jsonrpc": "2.0", "id": f"li{i}", "method": "server.info"}])
                            gen_ids.add(f"lb{i}")
                            other_ids.add(f"li{i}")
                        await asyncio.sleep(0.02)
                    _, frames = await read_until_answered(c, gen_ids | other_ids)
                    check_generate_answers(frames, gen_ids, other_ids)
                    codes = {f["id"]: f.get("error", {}).get("code") for f in frames if "method" not in f}
                    print(f"\n[engine death] {len(codes)} ids answered; -32004: "
                          f"{sum(1 for v in codes.values() if v == -32004)}, ok: {sum(1 for v in codes.values() if v is None)}")
                    # It comes back; later requests succeed.
                    for _ in range(200):
                        if backend.is_ready():
                            break
                        await asyncio.sleep(0.05)
                    r, _ = await c.call("generate", {"messages": SAY_HI, "max_tokens": 4, "tool_choice": "none"}, id="after")
                    assert "result" in r, r
            check_probe(probe, "engine death race")
    finally:
        await backend.stop()


# --------------------------------------------------------------------------- 5. drain and liveness


async def test_drain_closes_connections_concurrently(cfg, fake):
    from runtime.server import Server

    class SlowPeer:
        generates: dict = {}

        def __init__(self) -> None:
            self.closed_at: float | None = None

        def busy(self) -> bool:
            return False

        def cancel_all(self) -> None:
            pass

        def fail_inflight(self, reason: str) -> None:
            pass

        async def close(self, code: int, reason: str = "") -> None:
            await asyncio.sleep(3)  # a client that does not take its close frame
            self.closed_at = time.monotonic()

    server = Server(cfg, fake)
    peers = [SlowPeer() for _ in range(5)]
    server.connections.update(peers)
    t0 = time.monotonic()
    await server.drain(0)
    took = time.monotonic() - t0
    print(f"\n[drain] 5 peers that take 3 s each to close: drained in {took:.1f} s")
    assert took < 5 and all(p.closed_at is not None for p in peers)

    # Over real sockets: every client gets 1001 at about the same time, after the stream_end
    # and the response of its generate cancelled at the end of the grace period.
    fake.reply = lambda _request, _prompt: "word " * 200
    fake.token_delay_s = 0.01
    async with running_server(cfg, fake) as (addr, app):
        async with connect(addr) as a, connect(addr) as b:
            await a.send(generate_frame("long", max_tokens=500))
            assert (await a.recv(timeout=10))["method"] == "text_chunk"
            t0 = time.monotonic()
            await app.state.server.drain(0.2)
            frames = []
            with contextlib.suppress(Exception):
                while True:
                    frames.append(await a.recv(timeout=5))
            ends = [f for f in frames if f.get("method") == "stream_end"]
            assert [e["params"]["finish_reason"] for e in ends] == ["cancelled"]
            assert frames[-1]["id"] == "long" and frames[-1]["result"]["finish_reason"] == "cancelled"
            for c in (a, b):
                await asyncio.wait_for(c.ws.wait_closed(), timeout=5)
                assert c.ws.close_code == 1001
            assert time.monotonic() - t0 < 5


class _RestartFails(FakeBackend):
    async def restart(self) -> None:
        raise RuntimeError("cannot open /secret/internal/path: token=abc123")


class _StartFails(FakeBackend):
    async def start(self) -> None:
        raise RuntimeError("cannot open /secret/internal/path: token=abc123")


async def test_health_turns_503_after_failed_restarts_and_ready_hides_exceptions(cfg):
    backend = _RestartFails()
    await FakeBackend.start(backend)
    try:
        async with running_server(cfg, backend) as (addr, app), httpx.AsyncClient(base_url=f"http://{addr}") as http:
            server = app.state.server
            server.supervise_interval_s, server.restart_backoff_s = 0.05, 0.05
            assert (await http.get("/health")).status_code == 200
            backend.kill()
            for _ in range(200):
                health = await http.get("/health")
                if health.status_code == 503:
                    break
                await asyncio.sleep(0.05)
            assert health.status_code == 503 and server.restart_failures >= 3
            assert health.json()["status"] == "unhealthy" and "restart" in health.json()["reason"]
            ready = await http.get("/ready")
            assert ready.status_code == 503
            assert "secret" not in health.text and "secret" not in ready.text
    finally:
        await FakeBackend.stop(backend)
    # An engine that fails to start: /ready says so, without the exception's text.
    async with running_server(cfg, _StartFails()) as (addr, app), httpx.AsyncClient(base_url=f"http://{addr}") as http:
        for _ in range(100):
            ready = await http.get("/ready")
            if "error" in ready.json():
                break
            await asyncio.sleep(0.05)
        assert ready.status_code == 503 and "failed to start" in ready.json()["error"]
        assert "secret" not in ready.text and "abc123" not in ready.text
        assert "secret" in app.state.server.fatal  # kept for the log and the exit message


# --------------------------------------------------------------------------- 6. Origin


async def test_cross_site_origin_is_refused_by_default(cfg, fake):
    import websockets

    async def status(addr: str, **kwargs) -> int:
        try:
            async with websockets.connect(f"ws://{addr}/ws", **kwargs):
                return 101
        except websockets.InvalidStatus as exc:
            return exc.response.status_code

    assert not cfg.allowed_origins and not cfg.api_key
    async with running_server(cfg, fake) as (addr, _):
        port = addr.split(":")[1]
        async with stall_probe(addr) as probe:
            assert await status(addr, origin="https://evil.example") == 403
            assert await status(addr, origin="null") == 403
            assert await status(addr, origin=f"http://127.0.0.1:{int(port) + 1}") == 403  # another port
            assert await status(addr, origin=f"http://evil.example:{port}") == 403  # another host
            assert await status(addr) == 101  # no Origin: SDKs, scripts
            assert await status(addr, origin=f"http://127.0.0.1:{port}") == 101  # the server's own page
            assert await status(addr, origin=f"HTTP://127.0.0.1:{port}/") == 101
        check_probe(probe, "origins")
    listed = cfg.replace(allowed_origins=("https://agents.example",))
    async with running_server(listed, fake) as (addr, _):
        assert await status(addr, origin="https://agents.example") == 101
        assert await status(addr, origin="https://evil.example") == 403


# --------------------------------------------------------------------------- 7. SGLang's metrics


_WRITE_MP_METRICS = """
from prometheus_client import Counter, Gauge
Gauge("sglang:cache_hit_rate", "The prefix cache hit rate.", ["model_name"], multiprocess_mode="mostrecent").labels(model_name="m").set(0.625)
Gauge("sglang:num_queue_reqs", "Requests waiting.", ["model_name"], multiprocess_mode="mostrecent").labels(model_name="m").set(3)
Counter("sglang:prompt_tokens", "Prompt tokens.", ["model_name"]).labels(model_name="m").inc(42)
"""


async def test_metrics_include_the_engines_multiprocess_metrics(fake_server, tmp_path):
    from runtime.metrics import METRICS

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    await asyncio.to_thread(subprocess.run, [sys.executable, "-c", _WRITE_MP_METRICS], env=env, check=True, timeout=60)
    assert list(tmp_path.glob("*.db"))
    addr, _ = fake_server
    previous = METRICS.multiprocess_dir  # a real engine of this test session may have attached one
    METRICS.attach_multiprocess_dir(str(tmp_path))
    try:
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://{addr}/metrics")).text
    finally:
        METRICS.attach_multiprocess_dir(previous)
    assert "agent_runtime_requests_total" in text  # the runtime's own
    assert 'sglang:cache_hit_rate{model_name="m"} 0.625' in text
    assert 'sglang:num_queue_reqs{model_name="m"} 3.0' in text
    assert 'sglang:prompt_tokens_total{model_name="m"} 42.0' in text


def test_embedded_engine_is_asked_for_its_metrics():
    from conftest import test_config
    from runtime.backends.embedded import engine_kwargs
    from runtime.config import resolve_device

    def metrics(has_cuda: bool, **env: str) -> bool:
        cfg = test_config(**env).replace(device="auto")  # loaded for this machine: resolve it again
        return engine_kwargs(resolve_device(cfg, has_cuda=has_cuda), "/m")["enable_metrics"]

    assert metrics(False) is False  # auto: off on CPU, where they cost decode speed
    assert metrics(True) is True
    assert metrics(False, INFERENCE_ENGINE_METRICS="on") is True
    assert metrics(True, INFERENCE_ENGINE_METRICS="off") is False


@pytest.mark.engine
async def test_engine_metrics_in_metrics_endpoint(server):
    """The end-to-end check on the real engine: SGLang's scheduler metrics appear in /metrics."""
    addr, _ = server
    async with connect(addr) as c:
        r, _ = await c.call("generate", {"messages": SAY_HI, "max_tokens": 4, "tool_choice": "none"}, timeout=300)
        assert "result" in r
    text = ""
    async with httpx.AsyncClient() as http:
        for _ in range(60):  # the scheduler logs its stats every few decode steps
            text = (await http.get(f"http://{addr}/metrics")).text
            if "sglang:cache_hit_rate" in text and "sglang:num_queue_reqs" in text:
                break
            await asyncio.sleep(1)
    assert "agent_runtime_requests_total" in text
    for name in ("sglang:cache_hit_rate", "sglang:num_queue_reqs", "sglang:token_usage"):
        assert name in text, name
