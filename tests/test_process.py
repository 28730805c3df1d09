"""The server as a user runs it: its own process, killed engine processes, SIGTERM.

One server process for the module on the real engine (~40 s to start, ~30 s to restart), and one
on the fake backend (`INFERENCE_BACKEND=fake`, a few seconds) for what needs no engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import pytest_asyncio

from conftest import connect

ROOT = Path(__file__).resolve().parent.parent
STORY = [{"role": "user", "content": "Write a very long story about a dragon and a knight, with many chapters."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_ready(base: str, *, want: bool = True, timeout: float = 240) -> float:
    start = time.monotonic()
    async with httpx.AsyncClient(base_url=base, timeout=5) as http:
        while time.monotonic() - start < timeout:
            try:
                ok = (await http.get("/ready")).status_code == 200
            except httpx.TransportError:
                ok = False
            if ok == want:
                return time.monotonic() - start
            await asyncio.sleep(0.25)
    raise TimeoutError(f"/ready did not become {want} within {timeout} s")


@contextlib.asynccontextmanager
async def spawned_server(tmp_path_factory, **settings: str):
    """`python -m runtime serve` in its own process, with only these INFERENCE_* settings."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_")}
    if os.environ.get("INFERENCE_MODEL_CACHE_DIR"):
        env["INFERENCE_MODEL_CACHE_DIR"] = os.environ["INFERENCE_MODEL_CACHE_DIR"]
    env.update({"INFERENCE_PORT": str(port), "INFERENCE_LOG_JSON": "true", "PYTHONUNBUFFERED": "1", **settings})
    log = tmp_path_factory.mktemp("server") / "server.log"
    fh = open(log, "w")
    p = subprocess.Popen([sys.executable, "-m", "runtime", "serve"], cwd=tmp_path_factory.getbasetemp(), env=env,
                         stdout=fh, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            await wait_ready(base)
        except TimeoutError:
            raise AssertionError("server did not become ready:\n" + log.read_text()[-4000:]) from None
        yield {"proc": p, "base": base, "addr": f"127.0.0.1:{port}", "log": log}
    finally:
        if p.poll() is None:
            for child in psutil.Process(p.pid).children(recursive=True) if psutil.pid_exists(p.pid) else []:
                child.kill()
            p.kill()
            p.wait(10)
        fh.close()


@pytest_asyncio.fixture(scope="module")
async def proc_server(tmp_path_factory):
    async with spawned_server(tmp_path_factory, INFERENCE_SHUTDOWN_GRACE_S="90") as s:
        yield s


def engine_children(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


@pytest.mark.engine
async def test_ready_log_line_names_what_runs(proc_server):
    text = proc_server["log"].read_text()
    line = next(ln for ln in text.splitlines() if "ready: model=" in ln)
    for field in ("device=cpu", "dtype=bfloat16", "attention=torch_native", "kv_capacity_tokens=65536"):
        assert field in line


@pytest.mark.engine
async def test_engine_process_killed_mid_stream_then_recovered(proc_server):
    pid = proc_server["proc"].pid
    async with connect(proc_server["addr"]) as c:
        await c.send({"jsonrpc": "2.0", "id": "victim", "method": "generate",
                      "params": {"messages": STORY, "max_tokens": 400, "temperature": 0.7, "seed": 5, "tool_choice": "none"}})
        first = await c.recv()
        assert first["method"] == "text_chunk"
        scheduler = max(engine_children(pid), key=lambda p: p.memory_info().rss)  # the model lives there
        scheduler.kill()
        end = resp = None
        while resp is None:
            frame = await c.recv(timeout=60)
            if frame.get("method") == "stream_end":
                end = frame
            elif frame.get("id") == "victim":
                resp = frame
        assert end is not None and end["params"]["finish_reason"] == "error"
        assert resp["error"]["code"] == -32004
    # /ready turns false, the runtime restarts the engine by itself, later requests succeed.
    await wait_ready(proc_server["base"], want=True, timeout=240)
    async with connect(proc_server["addr"]) as c:
        ok, _ = await c.call("generate", {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8,
                                          "tool_choice": "none"}, timeout=120)
        assert ok["result"]["usage"]["completion_tokens"] > 0
    async with httpx.AsyncClient(base_url=proc_server["base"]) as http:
        metrics = (await http.get("/metrics")).text
    assert "agent_runtime_engine_restarts_total 1.0" in metrics


@pytest.mark.engine
async def test_sigterm_finishes_streams_and_exits_zero(proc_server):
    p = proc_server["proc"]
    children = engine_children(p.pid)
    assert children, "the engine runs in child processes"
    async with connect(proc_server["addr"]) as c:
        await c.send({"jsonrpc": "2.0", "id": "last", "method": "generate",
                      "params": {"messages": STORY, "max_tokens": 8, "tool_choice": "none"}})
        assert (await c.recv())["method"] == "text_chunk"
        p.send_signal(signal.SIGTERM)
        resp = None
        while resp is None:
            frame = await c.recv(timeout=60)
            if frame.get("id") == "last":
                resp = frame
        # In flight when SIGTERM came: it finished normally within the grace period.
        assert resp["result"]["finish_reason"] in ("stop", "length")
    rc = await asyncio.to_thread(p.wait, 150)
    assert rc == 0
    time.sleep(1)
    left = [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert left == [], f"SGLang processes left behind: {left}"
    log = proc_server["log"].read_text()
    assert '"event": "request"' in log  # structured request lines were switched on


async def test_fake_backend_process_serves_logs_and_exits_zero_on_sigterm(tmp_path_factory):
    # What `INFERENCE_BACKEND=fake ./launch.sh` gives: the server process without a model.
    # (SIGTERM with a stream in flight, and a killed engine, need a slow engine: see above.)
    async with spawned_server(tmp_path_factory, INFERENCE_BACKEND="fake") as s:
        line = next(ln for ln in s["log"].read_text().splitlines() if "ready: model=" in ln)
        assert "model=fake-chatml" in line and "backend=fake" in line
        async with connect(s["addr"]) as c:
            info, _ = await c.call("server.info", timeout=30)
            assert info["result"]["backend"] == "fake"
            ok, notes = await c.call("generate", {"messages": [{"role": "user", "content": "Say hi."}]}, timeout=30)
            assert ok["result"]["text"] == "Hello from the fake backend." and ok["result"]["finish_reason"] == "stop"
            assert [n["method"] for n in notes][-1] == "stream_end"
        s["proc"].send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(s["proc"].wait, 30) == 0
        log = s["log"].read_text()
        assert "draining" in log and '"event": "request"' in log  # structured request lines were switched on
