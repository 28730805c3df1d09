"""Load, limits, bad input and authentication against live servers on loopback.

These check the server, not the model: they run on the scripted fake backend (the real server on
a real socket), except the load test, which runs on the fake and on the real engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import pytest
import websockets
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import connect, running_server, stall_probe
from runtime.backends.fake import FakeBackend

SAY_HI = [{"role": "user", "content": "Say hi."}]


@contextlib.asynccontextmanager
async def _stopped(backend):
    """Stop a test's own backend when the test is done with it."""
    try:
        yield
    finally:
        await backend.stop()


async def handshake_status(addr: str, **kwargs) -> int:
    try:
        async with websockets.connect(f"ws://{addr}/ws", **kwargs):
            return 101
    except websockets.InvalidStatus as exc:
        return exc.response.status_code


# --------------------------------------------------------------------------- authentication


async def test_api_key_handshake_and_session_ownership(cfg, fake):
    backend = fake
    keyed = cfg.replace(api_key="key-one,key-two", allowed_origins=("https://agents.example",))
    async with running_server(keyed, backend) as (addr, _):
        assert await handshake_status(addr) == 401
        assert await handshake_status(addr, additional_headers={"Authorization": "Bearer wrong"}) == 401
        assert await handshake_status(addr, additional_headers={"Authorization": "Basic key-one"}) == 401
        one = {"Authorization": "Bearer key-one"}
        two = {"Authorization": "Bearer key-two"}
        assert await handshake_status(addr, additional_headers=one, origin="https://evil.example") == 403
        async with connect(addr, additional_headers=one, origin="https://agents.example") as c1:
            opened, _ = await c1.call("session.open", {"system_prompt": "You are terse."})
            sid = opened["result"]["session_id"]
            assert len(sid) > 20  # unguessable
        async with connect(addr, additional_headers=two) as c2:
            # Another key's session does not exist for this client.
            r, _ = await c2.call("generate", {"session_id": sid, "messages": SAY_HI, "max_tokens": 4})
            assert r["error"]["code"] == -32001
            r, _ = await c2.call("session.close", {"session_id": sid})
            assert r["error"]["code"] == -32001
        async with connect(addr, additional_headers=one) as c1:  # sessions outlive connections
            r, _ = await c1.call("generate", {"session_id": sid, "messages": SAY_HI, "max_tokens": 4, "tool_choice": "none"})
            assert r["result"]["usage"]["completion_tokens"] > 0
            r, _ = await c1.call("session.close", {"session_id": sid})
            assert r["result"] == {"closed": True}


# --------------------------------------------------------------------------- limits


async def test_limits(cfg):
    tight = cfg.replace(max_connections=3, max_inflight_per_connection=1, max_tokens_cap=64, max_sessions_per_key=2)
    # The default model's context, and slow enough that "a" is still running when "b" comes.
    backend = FakeBackend(context_length=8192, token_delay_s=0.01)
    await backend.start()
    async with running_server(tight, backend) as (addr, _), _stopped(backend):
        async with connect(addr) as c, connect(addr), connect(addr):
            assert await handshake_status(addr) == 503  # a fourth connection
            # max_tokens above the cap
            r, _ = await c.call("generate", {"messages": SAY_HI, "max_tokens": 65})
            assert r["error"]["code"] == -32602 and r["error"]["data"]["errors"][0]["field"] == "max_tokens"
            # context length, before the engine sees it
            huge = [{"role": "user", "content": "word " * 9000}]
            r, notes = await c.call("generate", {"messages": huge, "max_tokens": 4})
            assert r["error"]["code"] == -32002
            assert r["error"]["data"]["limit"] == 8192 and r["error"]["data"]["prompt_tokens"] > 8192
            assert [n["params"]["finish_reason"] for n in notes if n["method"] == "stream_end"] == ["error"]
            # generates in flight per connection
            await c.send({"jsonrpc": "2.0", "id": "a", "method": "generate",
                          "params": {"messages": SAY_HI, "max_tokens": 32, "tool_choice": "none"}})
            r, _ = await c.call("generate", {"messages": SAY_HI, "max_tokens": 4}, id="b")
            assert r["error"]["code"] == -32000 and r["error"]["data"]["retry_after_ms"] > 0
            while True:  # let "a" finish
                frame = await c.recv()
                if frame.get("id") == "a":
                    break
            # sessions per key
            for _ in range(2):
                ok, _ = await c.call("session.open", {})
                assert "result" in ok
            r, _ = await c.call("session.open", {})
            assert r["error"]["code"] == -32000


async def test_engine_queue_bound_answers_overloaded(cfg, fake):
    backend = fake
    backend.token_delay_s = 0.05  # the first two are still generating when the last two arrive
    async with running_server(cfg.replace(max_queue=2), backend) as (addr, _):
        async with connect(addr) as c:
            for i in range(4):
                await c.send({"jsonrpc": "2.0", "id": i, "method": "generate",
                              "params": {"messages": SAY_HI, "max_tokens": 24, "tool_choice": "none"}})
            answers = {}
            while len(answers) < 4:
                frame = await c.recv()
                if "id" in frame and "method" not in frame:
                    answers[frame["id"]] = frame
            overloaded = [a for a in answers.values() if "error" in a]
            assert len(overloaded) == 2 and all(a["error"]["code"] == -32000 for a in overloaded)
            assert all(a["error"]["data"]["retry_after_ms"] > 0 for a in overloaded)


async def test_client_that_stops_reading_is_closed(cfg, fake):
    backend = fake
    async with running_server(cfg.replace(send_queue_frames=16), backend) as (addr, app):
        # close_timeout: the server is gone by the end; the client's own close need not wait 10 s for it.
        ws = await websockets.connect(f"ws://{addr}/ws", max_queue=1, max_size=None, close_timeout=1)
        req = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "rpc.discover"})  # a large answer
        closed = False
        for _ in range(4000):
            try:
                await ws.send(req)
            except websockets.ConnectionClosed:
                closed = True
                break
            await asyncio.sleep(0)
            if not app.state.server.connections:
                closed = True
                break
        deadline = time.monotonic() + 20
        while app.state.server.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert closed or not app.state.server.connections, "the server kept buffering for a client that does not read"
        await ws.close()


# --------------------------------------------------------------------------- bad input


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
methods = st.sampled_from(["server.info", "cancel", "session.close", "session.open", "generate", "nope", "rpc.discover"])
requests = st.fixed_dictionaries(
    {"jsonrpc": st.sampled_from(["2.0", "2.0", "1.0"]), "method": methods,
     "id": st.one_of(st.integers(), st.text(max_size=8))},
    optional={"params": json_values},
)
frames = st.one_of(
    st.text(max_size=200),
    json_values.map(json.dumps),
    requests.map(json.dumps),
    st.lists(requests, min_size=1, max_size=5).map(json.dumps),
)


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def _fuzz(addr: str) -> None:
    from websockets.sync.client import connect as sync_connect

    with sync_connect(f"ws://{addr}/ws", max_size=None) as ws:

        # No shrinking: each example is a round trip to a live server, and the failing frame
        # itself is what a reader needs. derandomize: the same frames in CI every run.
        @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  phases=[Phase.explicit, Phase.generate], database=None)
        @given(frame=frames)
        def check(frame: str) -> None:
            try:  # strictly, as the server reads it: json.loads alone takes Infinity and NaN
                value = json.loads(frame, parse_constant=_not_json)
            except ValueError:
                value = None
            ws.send(frame)
            ws.send(json.dumps({"jsonrpc": "2.0", "id": "probe", "method": "server.info"}))
            # Replies may come in any order (session.open warms the engine; server.info does not):
            # read until the probe and every request of the frame are answered.
            missing = list(_ids_expecting_reply(value)) + ["probe"]
            while missing:
                reply = json.loads(ws.recv(timeout=120))
                for item in reply if isinstance(reply, list) else [reply]:
                    if isinstance(item, dict) and "method" not in item:
                        assert ("result" in item) != ("error" in item), item
                        if item.get("id") in missing:
                            missing.remove(item.get("id"))

        check()


def _ids_expecting_reply(value) -> list:
    items = value if isinstance(value, list) else [value]
    return [i["id"] for i in items if isinstance(i, dict) and "id" in i and i.get("jsonrpc") == "2.0"
            and isinstance(i.get("method"), str) and isinstance(i["id"], (str, int)) and not isinstance(i["id"], bool)
            and i["method"] != "generate"]


async def test_fuzzed_frames_never_crash_and_every_request_is_answered(cfg, fake):
    backend = fake
    # generate params are fuzzed too, but max_tokens small keeps accidental generations short.
    async with running_server(cfg.replace(max_tokens_cap=8, default_max_tokens=4), backend) as (addr, _):
        async with stall_probe(addr) as probe:
            await asyncio.to_thread(_fuzz, addr)
        assert probe.round_trips_ms and probe.unanswered == 0 and probe.worst_ms < 250, probe.worst_ms
        async with connect(addr) as c:
            ok, _ = await c.call("server.info")
            assert "result" in ok


# --------------------------------------------------------------------------- load


@pytest.mark.engine
async def test_fifty_connections_several_turns_nothing_lost(server, backend):
    # The real engine's scheduler and radix cache under 50 concurrent sessions.
    await fifty_connections(server, backend)


async def test_fifty_connections_several_turns_nothing_lost_on_the_fake(fake_server, fake):
    # The server's own concurrency (connections, sessions, one stream_end each), in seconds.
    await fifty_connections(fake_server, fake)


async def fifty_connections(server, backend) -> None:
    addr = server[0]
    n_conn, turns = 50, 3
    stats = {"answered": 0, "stream_ends": 0}

    async def agent(i: int) -> None:
        async with connect(addr) as c:
            opened, _ = await c.call("session.open", {"system_prompt": "You are a terse assistant."}, timeout=300)
            sid = opened["result"]["session_id"]
            for t in range(turns):
                r, notes = await c.call("generate", {"session_id": sid, "max_tokens": 3, "tool_choice": "none",
                                                     "messages": [{"role": "user", "content": f"Client {i}, turn {t}: say ok."}]},
                                        timeout=600)
                assert "result" in r, r
                ends = [n for n in notes if n.get("method") == "stream_end"]
                assert len(ends) == 1 and ends[0]["params"]["request_id"] == r["id"]
                stats["answered"] += 1
                stats["stream_ends"] += len(ends)
                if t > 0:
                    assert r["result"]["usage"]["cached_tokens"] > 0
            closed, _ = await c.call("session.close", {"session_id": sid})
            assert closed["result"] == {"closed": True}

    await asyncio.gather(*(agent(i) for i in range(n_conn)))
    assert stats == {"answered": n_conn * turns, "stream_ends": n_conn * turns}
    assert await backend.engine_requests() == 0


# --------------------------------------------------------------------------- a dying engine


async def test_engine_death_mid_stream_is_engine_unavailable_then_restarted(cfg):
    # The in-process view of tests/test_process.py's killed engine: the fake "dies" mid-stream
    # (its own backend: the supervisor restarts what it serves).
    from runtime.metrics import METRICS

    backend = FakeBackend(token_delay_s=0.01)
    await backend.start()
    restarts = METRICS.registry.get_sample_value("agent_runtime_engine_restarts_total")
    async with running_server(cfg, backend) as (addr, _), _stopped(backend):
        async with connect(addr) as c:
            await c.send({"jsonrpc": "2.0", "id": "victim", "method": "generate",
                          "params": {"messages": SAY_HI, "max_tokens": 24, "tool_choice": "none"}})
            assert (await c.recv())["method"] == "text_chunk"
            backend.kill()
            end = resp = None
            while resp is None:
                frame = await c.recv(timeout=30)
                if frame.get("method") == "stream_end":
                    end = frame
                elif frame.get("id") == "victim":
                    resp = frame
            assert end is not None and end["params"]["finish_reason"] == "error"
            assert resp["error"]["code"] == -32004 and end["params"]["error"] == resp["error"]
            # The supervisor notices (within about a second) and restarts it; later requests succeed.
            for _ in range(100):
                if METRICS.registry.get_sample_value("agent_runtime_engine_restarts_total") > restarts and backend.is_ready():
                    break
                await asyncio.sleep(0.05)
            assert METRICS.registry.get_sample_value("agent_runtime_engine_restarts_total") == restarts + 1
            ok, _ = await c.call("generate", {"messages": SAY_HI, "max_tokens": 8, "tool_choice": "none"})
            assert ok["result"]["usage"]["completion_tokens"] > 0
