"""The JSON-RPC WebSocket over a real socket (uvicorn on loopback).

What needs a real model (an answer's content, the engine's prefix cache and finish reasons, what
server.info reports of the embedded engine) runs on the real engine (`engine` marker); the
protocol itself (spec examples, close codes, cancel and disconnect, duplicate ids, busy
sessions) runs on the scripted fake backend, through the same server.

The tests written against `rpc_server` / `rpc_backend` are collected a second time by
tests/test_remote.py, which points those two fixtures at each remote backend.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct

import httpx
import pytest
import websockets

from conftest import connect

# "Name the capital of France." and not "What is the capital of France?": the default model's greedy
# answer to the latter starts on a 0.1-nat margin between "The" and "L" (float32), which the
# rounding of another CPU's GEMMs or a differently batched cached prefix can flip; this one's
# every token leads by about a nat or more (bf16 and float32).
FRANCE = [{"role": "user", "content": "Name the capital of France."}]
STORY = [{"role": "user", "content": "Write a very long story about a dragon and a knight, with many chapters."}]
# What the fake "writes" for STORY: far more than 400 tokens (one token per byte), slowly.
LONG_STORY = " ".join(f"Chapter {i}: the dragon and the knight rode on through the night." for i in range(40))


@pytest.fixture
def rpc_server(fake_server):
    """The server the protocol tests talk to: the real server on the fake backend."""
    return fake_server


@pytest.fixture
def rpc_backend(fake):
    """What `rpc_server` generates with: a long story, streamed slowly enough to cancel."""
    fake.reply = lambda _request, _prompt: LONG_STORY
    fake.token_delay_s = 0.005
    return fake


async def test_health_ready_metrics(fake_server):
    addr, _ = fake_server
    async with httpx.AsyncClient(base_url=f"http://{addr}") as http:
        assert (await http.get("/health")).json() == {"status": "ok"}
        ready = await http.get("/ready")
        assert ready.status_code == 200 and ready.json() == {"ready": True}
        metrics = await http.get("/metrics")
        assert metrics.status_code == 200 and "agent_runtime_requests_total" in metrics.text


@pytest.mark.engine
async def test_server_info_and_discover(server):
    async with connect(server[0]) as c:
        info, _ = await c.call("server.info", {})
        r = info["result"]
        assert r["protocol_version"] == 1 and r["backend"] == "embedded" and r["context_length"] == 8192
        assert r["limits"]["max_frame_bytes"] > 0
        doc, _ = await c.call("rpc.discover")
        names = {m["name"] for m in doc["result"]["methods"]}
        assert {"session.open", "generate", "cancel", "session.close", "server.info", "rpc.discover"} <= names


@pytest.mark.engine
async def test_stateless_generate_streams_then_ends_once(server):
    async with connect(server[0]) as c:
        resp, notes = await c.call("generate", {"messages": FRANCE, "max_tokens": 24, "tool_choice": "none"}, id="g1")
        result = resp["result"]
        chunks = [n for n in notes if n["method"] == "text_chunk"]
        ends = [n for n in notes if n["method"] == "stream_end"]
        assert len(ends) == 1 and notes[-1]["method"] == "stream_end", "stream_end must come last, once"
        assert all(n["params"]["request_id"] == "g1" for n in notes)
        assert "".join(n["params"]["text"] for n in chunks) == result["text"]
        assert "Paris" in result["text"] and "<|im_end|>" not in result["text"]
        assert result["finish_reason"] == "stop" and result["tool_calls"] == []
        usage = result["usage"]
        assert set(usage) == {"prompt_tokens", "cached_tokens", "completion_tokens"}
        assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
        assert ends[0]["params"]["usage"] == usage and ends[0]["params"]["finish_reason"] == "stop"
        assert result["timings"]["total_ms"] >= result["timings"]["ttft_ms"] > 0
        # Same history again: the prefix cache serves it.
        again, _ = await c.call("generate", {"messages": FRANCE, "max_tokens": 24, "tool_choice": "none"})
        assert again["result"]["usage"]["cached_tokens"] >= usage["prompt_tokens"] - 1


@pytest.mark.engine
async def test_length_finish(server):
    async with connect(server[0]) as c:
        resp, _ = await c.call("generate", {"messages": STORY, "max_tokens": 3, "tool_choice": "none"})
        assert resp["result"]["finish_reason"] == "length" and resp["result"]["usage"]["completion_tokens"] == 3


async def wait_engine_requests(backend, done, timeout=10.0):
    """Polls until `done(engine_requests())`. SGLang's load snapshot (what /v1/loads and
    `get_loads` read) is published after each prefill, when idle, and only every 15th decode step,
    so one reading right after a prefill can still say 0."""
    for _ in range(int(timeout / 0.1)):
        if done(await backend.engine_requests()):
            return True
        await asyncio.sleep(0.1)
    return False


async def wait_engine_idle(backend, timeout=10.0):
    return await wait_engine_requests(backend, lambda n: n == 0, timeout)


async def test_cancel_while_info_is_answered(rpc_server, rpc_backend):
    server, backend = rpc_server, rpc_backend
    async with connect(server[0]) as c:
        await c.send({"jsonrpc": "2.0", "id": "long", "method": "generate",
                      "params": {"messages": STORY, "max_tokens": 400, "temperature": 0.7, "seed": 3, "tool_choice": "none"}})
        first = await c.recv()
        assert first["method"] == "text_chunk"  # it is streaming
        # A long generate does not hold up other calls on the same connection.
        await c.send({"jsonrpc": "2.0", "id": "i", "method": "server.info"})
        await c.send({"jsonrpc": "2.0", "id": "c", "method": "cancel", "params": {"request_id": "long"}})
        got: dict = {}
        ends = []
        while "long" not in got:
            frame = await c.recv()
            if frame.get("method") == "stream_end":
                ends.append(frame)
            elif "id" in frame:
                got[frame["id"]] = frame
        assert got["i"]["result"]["protocol_version"] == 1
        assert got["c"]["result"] == {"cancelled": True}
        assert len(ends) == 1 and ends[0]["params"]["finish_reason"] == "cancelled"
        assert got["long"]["result"]["finish_reason"] == "cancelled"
        assert got["long"]["result"]["usage"]["completion_tokens"] < 400
        # Cancelling something finished, or unknown, says so.
        again, _ = await c.call("cancel", {"request_id": "long"})
        assert again["result"] == {"cancelled": False}
    assert await wait_engine_idle(backend), "the cancelled request still holds the engine"


async def test_disconnect_mid_stream_aborts_engine_work(rpc_server, rpc_backend):
    server, backend = rpc_server, rpc_backend
    async with connect(server[0]) as c:
        await c.send({"jsonrpc": "2.0", "id": 1, "method": "generate",
                      "params": {"messages": STORY, "max_tokens": 400, "temperature": 0.7, "seed": 4, "tool_choice": "none"}})
        frame = await c.recv()
        assert frame["method"] == "text_chunk"
        assert await wait_engine_requests(backend, lambda n: n >= 1), "the engine never held the generation"
    assert await wait_engine_idle(backend), "a disconnected client's generation kept running"


# --------------------------------------------------------------------------- JSON-RPC 2.0, section 7


async def exchange(c, text: str, *, expect_reply: bool = True):
    await c.ws.send(text)
    if not expect_reply:
        # A reply would arrive before the answer to a probe request sent right after.
        await c.send({"jsonrpc": "2.0", "id": "probe", "method": "server.info"})
        frame = await c.recv()
        assert isinstance(frame, dict) and frame.get("id") == "probe", f"unexpected reply {frame}"
        return None
    return await c.recv()


async def test_jsonrpc_spec_examples_over_the_socket(fake_server):
    server = fake_server
    async with connect(server[0]) as c:
        # rpc call with named parameters
        r = await exchange(c, '{"jsonrpc": "2.0", "method": "server.info", "params": {}, "id": 3}')
        assert r["id"] == 3 and r["result"]["protocol_version"] == 1
        # a Notification: nothing back
        await exchange(c, '{"jsonrpc": "2.0", "method": "server.info"}', expect_reply=False)
        # non-existent method
        r = await exchange(c, '{"jsonrpc": "2.0", "method": "foobar", "id": "1"}')
        assert r == {"jsonrpc": "2.0", "error": r["error"], "id": "1"} and r["error"]["code"] == -32601
        # invalid JSON
        r = await exchange(c, '{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]')
        assert r["error"]["code"] == -32700 and r["id"] is None
        # invalid Request object
        r = await exchange(c, '{"jsonrpc": "2.0", "method": 1, "params": "bar"}')
        assert r["error"]["code"] == -32600 and r["id"] is None
        # batch, invalid JSON
        r = await exchange(c, '[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},{"jsonrpc": "2.0", "method"]')
        assert r["error"]["code"] == -32700 and r["id"] is None
        # empty Array
        r = await exchange(c, "[]")
        assert isinstance(r, dict) and r["error"]["code"] == -32600 and r["id"] is None
        # invalid Batch but not empty
        r = await exchange(c, "[1]")
        assert isinstance(r, list) and len(r) == 1 and r[0]["error"]["code"] == -32600 and r[0]["id"] is None
        # invalid Batch
        r = await exchange(c, "[1,2,3]")
        assert isinstance(r, list) and len(r) == 3 and all(e["error"]["code"] == -32600 for e in r)
        # mixed batch: only the requests are answered, errors included
        r = await exchange(c, json.dumps([
            {"jsonrpc": "2.0", "method": "server.info", "id": "1"},
            {"jsonrpc": "2.0", "method": "server.info"},
            {"jsonrpc": "2.0", "method": "cancel", "params": {"request_id": "nope"}, "id": "2"},
            {"foo": "boo"},
            {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
            {"jsonrpc": "2.0", "method": "session.close", "params": {"session_id": "x"}, "id": "9"},
        ]))
        by_id = {e["id"]: e for e in r if e["id"] is not None}
        assert len(r) == 5
        assert by_id["1"]["result"]["protocol_version"] == 1
        assert by_id["2"]["result"] == {"cancelled": False}
        assert by_id["5"]["error"]["code"] == -32601
        assert by_id["9"]["error"]["code"] == -32001
        assert [e for e in r if e["id"] is None][0]["error"]["code"] == -32600
        # batch of notifications: nothing at all
        await exchange(c, json.dumps([{"jsonrpc": "2.0", "method": "server.info"}, {"jsonrpc": "2.0", "method": "rpc.discover"}]),
                       expect_reply=False)


async def test_invalid_params_name_the_field(rpc_server):
    server = rpc_server
    async with connect(server[0]) as c:
        r, notes = await c.call("generate", {"messages": [{"role": "wizard", "content": "hi"}]})
        err = r["error"]
        assert err["code"] == -32602 and err["data"]["errors"][0]["field"].startswith("messages.0.role")
        # Every generate with an id ends with one stream_end, even one refused at validation.
        assert [n["params"]["finish_reason"] for n in notes if n["method"] == "stream_end"] == ["error"]
        r, _ = await c.call("generate", {"messages": FRANCE, "max_tokens": "many"})
        assert r["error"]["code"] == -32602 and r["error"]["data"]["errors"][0]["field"] == "max_tokens"
        r, _ = await c.call("generate", {"messages": FRANCE, "colour": "blue"})
        assert r["error"]["code"] == -32602 and r["error"]["data"]["errors"][0]["field"] == "colour"


async def test_deeply_nested_json_does_not_crash(fake_server):
    server = fake_server
    async with connect(server[0]) as c:
        r = await exchange(c, "[" * 100_000 + "]" * 100_000)
        assert r["error"]["code"] in (-32600, -32700) and r["id"] is None
        ok, _ = await c.call("server.info")
        assert "result" in ok


async def test_binary_frame_closes_with_1003_and_others_keep_working(fake_server):
    server = fake_server
    addr = server[0]
    async with connect(addr) as other:
        async with connect(addr) as c:
            await c.ws.send(b"\x00\x01binary")
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await c.recv(timeout=10)
            assert closed.value.rcvd.code == 1003
        ok, _ = await other.call("server.info")
        assert "result" in ok


async def test_oversized_frame_closes_with_1009(fake_server):
    server = fake_server
    _, app = server
    limit = app.state.server.cfg.max_frame_bytes
    async with connect(server[0]) as c:
        await c.ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "server.info", "params": {"x": "a" * limit}}))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await c.recv(timeout=10)
        assert closed.value.rcvd.code == 1009


def _raw_ws(addr: str) -> socket.socket:
    host, port = addr.split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    assert b" 101 " in head.split(b"\r\n")[0]
    return s


def _frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    header = bytes([0x80 | opcode]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n))
    return header + mask + masked


async def test_invalid_utf8_text_frame_closes_with_1007(fake_server):
    server = fake_server
    def run() -> int:
        s = _raw_ws(server[0])
        s.sendall(_frame(0x1, b'{"jsonrpc": "2.0", "method": "\xff\xfe", "id": 1}'))
        data = b""
        while len(data) < 4:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.close()
        assert data[0] & 0x0F == 0x8, f"expected a close frame, got {data[:8]!r}"
        return struct.unpack("!H", data[2:4])[0]

    assert await asyncio.to_thread(run) == 1007
    async with connect(server[0]) as c:
        ok, _ = await c.call("server.info")
        assert "result" in ok


# --------------------------------------------------------------------------- one request id, one session turn


async def test_duplicate_generate_id_in_flight_is_refused_without_a_stream(fake_server, fake):
    fake.reply = lambda _request, _prompt: LONG_STORY
    fake.token_delay_s = 0.01
    async with connect(fake_server[0]) as c:
        await c.send({"jsonrpc": "2.0", "id": "dup", "method": "generate", "params": {"messages": STORY, "max_tokens": 60}})
        first = await c.recv()
        assert first["method"] == "text_chunk"
        await c.send({"jsonrpc": "2.0", "id": "dup", "method": "generate", "params": {"messages": FRANCE, "max_tokens": 4}})
        responses, notes = [], [first]
        while not any("result" in r for r in responses):
            frame = await c.recv()
            (notes if "method" in frame else responses).append(frame)
        refused, done = responses
        # The second "dup" is answered at once, and has no stream of its own: its notifications
        # would be indistinguishable from the first one's.
        assert refused["error"]["code"] == -32600 and refused["error"]["data"]["reason"] == "duplicate id in flight"
        ends = [n for n in notes if n["method"] == "stream_end"]
        assert len(ends) == 1 and notes[-1] is ends[0] and ends[0]["params"]["finish_reason"] == "length"
        assert done["result"]["finish_reason"] == "length" and done["result"]["usage"]["completion_tokens"] == 60
        assert "".join(n["params"]["text"] for n in notes if n["method"] == "text_chunk") == done["result"]["text"] == LONG_STORY[:60]
        # Once it ended, the id is free again.
        again, notes = await c.call("generate", {"messages": FRANCE, "max_tokens": 4}, id="dup")
        assert again["result"]["finish_reason"] == "length" and [n["method"] for n in notes][-1] == "stream_end"


async def test_a_busy_session_refuses_a_second_turn(fake_server, fake):
    async with connect(fake_server[0]) as c:
        opened, _ = await c.call("session.open", {"system_prompt": "You are terse."})
        sid = opened["result"]["session_id"]
        fake.reply = lambda _request, _prompt: LONG_STORY
        fake.token_delay_s = 0.01
        say = [{"role": "user", "content": "Tell me a story."}]
        await c.send({"jsonrpc": "2.0", "id": "t1", "method": "generate",
                      "params": {"session_id": sid, "messages": say, "max_tokens": 40}})
        assert (await c.recv())["method"] == "text_chunk"
        busy, notes = await c.call("generate", {"session_id": sid, "messages": say, "max_tokens": 4}, id="t2")
        assert busy["error"]["code"] == -32602
        assert busy["error"]["data"]["errors"][0]["field"] == "session_id"
        t2_ends = [n for n in notes if n["method"] == "stream_end" and n["params"]["request_id"] == "t2"]
        assert [n["params"]["finish_reason"] for n in t2_ends] == ["error"]
        while True:  # the running turn is not disturbed
            frame = await c.recv()
            if frame.get("id") == "t1":
                break
        assert frame["result"]["finish_reason"] == "length" and frame["result"]["usage"]["completion_tokens"] == 40
        # One turn at a time, not one turn ever: the next turn runs.
        fake.token_delay_s = 0.0
        r, _ = await c.call("generate", {"session_id": sid, "messages": say, "max_tokens": 4}, id="t3")
        assert r["result"]["finish_reason"] == "length"
        assert r["result"]["usage"]["cached_tokens"] > 0  # the session's earlier turn, as the fake's cache saw it
