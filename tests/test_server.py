"""The JSON-RPC WebSocket over a real socket (uvicorn on loopback), with the real engine."""

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

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a very long story about a dragon and a knight, with many chapters."}]


async def test_health_ready_metrics(server):
    addr, _ = server
    async with httpx.AsyncClient(base_url=f"http://{addr}") as http:
        assert (await http.get("/health")).json() == {"status": "ok"}
        ready = await http.get("/ready")
        assert ready.status_code == 200 and ready.json() == {"ready": True}
        metrics = await http.get("/metrics")
        assert metrics.status_code == 200 and "agent_runtime_requests_total" in metrics.text


async def test_server_info_and_discover(server):
    async with connect(server[0]) as c:
        info, _ = await c.call("server.info", {})
        r = info["result"]
        assert r["protocol_version"] == 1 and r["backend"] == "embedded" and r["context_length"] == 8192
        assert r["limits"]["max_frame_bytes"] > 0
        doc, _ = await c.call("rpc.discover")
        names = {m["name"] for m in doc["result"]["methods"]}
        assert {"session.open", "generate", "cancel", "session.close", "server.info", "rpc.discover"} <= names


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


async def test_length_finish(server):
    async with connect(server[0]) as c:
        resp, _ = await c.call("generate", {"messages": STORY, "max_tokens": 3, "tool_choice": "none"})
        assert resp["result"]["finish_reason"] == "length" and resp["result"]["usage"]["completion_tokens"] == 3


async def wait_engine_idle(backend, timeout=10.0):
    for _ in range(int(timeout / 0.1)):
        if await backend.engine_requests() == 0:
            return True
        await asyncio.sleep(0.1)
    return False


async def test_cancel_while_info_is_answered(server, backend):
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


async def test_disconnect_mid_stream_aborts_engine_work(server, backend):
    async with connect(server[0]) as c:
        await c.send({"jsonrpc": "2.0", "id": 1, "method": "generate",
                      "params": {"messages": STORY, "max_tokens": 400, "temperature": 0.7, "seed": 4, "tool_choice": "none"}})
        frame = await c.recv()
        assert frame["method"] == "text_chunk"
        assert await backend.engine_requests() >= 1
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


async def test_jsonrpc_spec_examples_over_the_socket(server):
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


async def test_invalid_params_name_the_field(server):
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


async def test_deeply_nested_json_does_not_crash(server):
    async with connect(server[0]) as c:
        r = await exchange(c, "[" * 100_000 + "]" * 100_000)
        assert r["error"]["code"] in (-32600, -32700) and r["id"] is None
        ok, _ = await c.call("server.info")
        assert "result" in ok


async def test_binary_frame_closes_with_1003_and_others_keep_working(server):
    addr = server[0]
    async with connect(addr) as other:
        async with connect(addr) as c:
            await c.ws.send(b"\x00\x01binary")
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await c.recv(timeout=10)
            assert closed.value.rcvd.code == 1003
        ok, _ = await other.call("server.info")
        assert "result" in ok


async def test_oversized_frame_closes_with_1009(server):
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


async def test_invalid_utf8_text_frame_closes_with_1007(server):
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
