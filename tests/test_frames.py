"""Every kind of frame the server sends, over a real socket, checked against protocol's models.

One conversation with the real server (on the scripted fake backend) draws out each result,
each notification, the JSON-RPC errors and a batch reply. Each frame is checked as it arrives:

- the envelope: a response is exactly {jsonrpc, id, result|error}, a notification exactly
  {jsonrpc, method, params} (protocol/jsonrpc.py builds no other shape);
- the payload: validated by the model protocol/jsonrpc.py names for it (METHODS[...].result,
  NOTIFICATIONS[...]), strictly: the result and notification models are lenient by design
  (`_Wire` ignores unknown fields, for older readers), so here they are validated as copies with
  extra="forbid", in strict mode, and the model's own dump must give back the frame exactly, which
  catches an unexpected or coerced field at any depth, nested models included;
- an error object: ErrorObject, with the code in protocol.errors' table and the `data` members
  that table promises.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
from typing import Any

import websockets
from pydantic import BaseModel, ConfigDict, RootModel

from conftest import running_server
from protocol.errors import ERROR_CODES
from protocol.jsonrpc import METHODS, NOTIFICATIONS
from protocol.models import ErrorObject

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
TABLE = {row.code: row for row in ERROR_CODES}


@functools.cache
def forbidding(model: type[BaseModel]) -> type[BaseModel]:
    """`model`, refusing fields it does not declare."""
    if issubclass(model, RootModel):
        return model
    return type(f"Strict{model.__name__}", (model,), {"__module__": __name__, "model_config": ConfigDict(extra="forbid")})


def validate(model: type[BaseModel], value: Any) -> None:
    parsed = forbidding(model).model_validate_json(json.dumps(value), strict=True)
    assert parsed.model_dump(mode="json") == value, f"{model.__name__}: the frame holds more, or other, than the model\n{value}"


def validate_error(error: Any) -> int:
    validate(ErrorObject, error)
    row = TABLE.get(error["code"])
    assert row is not None, f"error code {error['code']} is not in protocol.errors.ERROR_CODES"
    assert set(row.data) <= set(error.get("data") or {}), f"{row.name} promises data members {row.data}: {error}"
    return error["code"]


class Wire:
    """A raw WebSocket client that validates every frame it receives and records its kind."""

    def __init__(self, ws: Any):
        self.ws = ws
        self.methods: dict[Any, str] = {}  # request id -> method, to know which result model applies
        self.seen: set[str] = set()

    async def send(self, payload: Any) -> None:
        if isinstance(payload, str):
            await self.ws.send(payload)
            return
        for item in payload if isinstance(payload, list) else [payload]:
            if isinstance(item, dict) and "id" in item and isinstance(item.get("method"), str):
                self.methods[item["id"]] = item["method"]
        await self.ws.send(json.dumps(payload))

    async def recv(self) -> Any:
        frame = json.loads(await asyncio.wait_for(self.ws.recv(), 30))
        if isinstance(frame, list):
            assert frame, "a batch reply is never an empty array"
            self.seen.add("batch")
            for item in frame:
                self._response(item)
        elif "method" in frame:
            self._notification(frame)
        else:
            self._response(frame)
        return frame

    async def until(self, id: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Frames up to the response with this id: (response, notifications before it)."""
        notes = []
        while True:
            frame = await self.recv()
            if isinstance(frame, dict) and "method" in frame:
                notes.append(frame)
            elif isinstance(frame, dict) and frame["id"] == id:
                return frame, notes

    async def call(self, method: str, params: Any = None, *, id: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        msg = {"jsonrpc": "2.0", "method": method, "id": id}
        if params is not None:
            msg["params"] = params
        await self.send(msg)
        return await self.until(id)

    def _notification(self, frame: dict[str, Any]) -> None:
        assert set(frame) == {"jsonrpc", "method", "params"} and frame["jsonrpc"] == "2.0", frame
        method, params = frame["method"], frame["params"]
        assert method in NOTIFICATIONS, f"unknown notification {method!r}"
        validate(NOTIFICATIONS[method][0], params)
        if method == "stream_end" and "error" in params:
            validate_error(params["error"])
            self.seen.add("stream_end+error")
        else:
            self.seen.add(method)

    def _response(self, frame: dict[str, Any]) -> None:
        assert isinstance(frame, dict) and frame.get("jsonrpc") == "2.0", frame
        assert set(frame) in ({"jsonrpc", "id", "result"}, {"jsonrpc", "id", "error"}), frame
        rid = frame["id"]
        assert rid is None or (isinstance(rid, (str, int, float)) and not isinstance(rid, bool)), frame
        if "result" in frame:
            method = self.methods[rid]
            validate(METHODS[method].result, frame["result"])
            self.seen.add(f"result:{method}")
        else:
            self.seen.add(f"error:{validate_error(frame['error'])}")


async def test_every_frame_the_server_sends_matches_the_protocol_models(cfg, fake_server, fake):
    async with websockets.connect(f"ws://{fake_server[0]}/ws", max_size=None) as ws:
        w = Wire(ws)
        # ------------------------------------------------------------- results of each method
        r, _ = await w.call("server.info", {}, id=1)
        assert r["result"]["backend"] == "fake"
        r, _ = await w.call("rpc.discover", id=2)
        assert r["result"]["openrpc"].startswith("1.")
        opened, _ = await w.call("session.open", {"system_prompt": "You are a weather bot.", "tools": [WEATHER]}, id=3)
        sid = opened["result"]["session_id"]

        # text, then a call: text_chunk, function_call_request, stream_end, generate's result
        fake.replies.append("Let me look. " + fake.call_text("get_weather", {"city": "Paris"}))
        r, notes = await w.call("generate", {"session_id": sid, "messages": ASK}, id="g1")
        assert [n["method"] for n in notes][-2:] == ["function_call_request", "stream_end"]
        assert r["result"]["finish_reason"] == "tool_calls" and r["result"]["text"] == "Let me look. "
        call = r["result"]["tool_calls"][0]
        fake.replies.append("It is sunny.")
        r, _ = await w.call("generate", {"session_id": sid, "messages": [
            {"role": "tool", "tool_call_id": call["call_id"], "content": "sunny"}]}, id="g2")
        assert r["result"]["text"] == "It is sunny." and r["result"]["finish_reason"] == "stop"

        # cancel's result, and a cancelled generate's stream_end and result
        fake.reply = lambda _request, _prompt: "word " * 200
        fake.token_delay_s = 0.01
        await w.send({"jsonrpc": "2.0", "id": "g3", "method": "generate", "params": {"messages": ASK, "tool_choice": "none"}})
        assert (await w.recv())["method"] == "text_chunk"
        r, _ = await w.call("cancel", {"request_id": "g3"}, id=4)
        assert r["result"] == {"cancelled": True}
        r, notes = await w.until("g3")
        assert r["result"]["finish_reason"] == "cancelled" and notes[-1]["params"]["finish_reason"] == "cancelled"
        fake.token_delay_s = 0.0

        r, _ = await w.call("session.close", {"session_id": sid}, id=5)
        assert r["result"] == {"closed": True}

        # ------------------------------------------------------------- errors
        # a generate that fails: stream_end with its error, then the error response
        r, notes = await w.call("generate", {"session_id": sid, "messages": ASK}, id="g4")
        assert r["error"]["code"] == -32001 and notes[-1]["params"]["error"] == r["error"]
        # ... also once it reached the backend: a call that breaks its tool's schema
        fake.replies.append(fake.call_text("get_weather", {"city": 5}))
        r, notes = await w.call("generate", {"messages": ASK, "tools": [WEATHER], "tool_choice": "required"}, id="g5")
        assert r["error"]["code"] == -32603 and notes[-1]["params"]["error"] == r["error"]
        await w.send('{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]')
        r = await w.recv()
        assert r["error"]["code"] == -32700 and r["id"] is None
        await w.send('{"jsonrpc": "2.0", "method": 1, "params": "bar"}')
        r = await w.recv()
        assert r["error"]["code"] == -32600 and r["id"] is None
        r, _ = await w.call("nope", id=6)
        assert r["error"]["code"] == -32601
        r, _ = await w.call("cancel", {"request_id": 1.5}, id=7)
        assert r["error"]["code"] == -32602

        # ------------------------------------------------------------- a batch reply
        await w.send([
            {"jsonrpc": "2.0", "method": "server.info", "id": 8},
            {"jsonrpc": "2.0", "method": "server.info"},  # a notification: no answer
            {"jsonrpc": "2.0", "method": "session.close", "params": {"session_id": sid}, "id": 9},
            {"foo": "boo"},
            {"jsonrpc": "2.0", "method": "nope", "id": 10},
        ])
        batch = await w.recv()
        assert isinstance(batch, list) and [e["id"] for e in batch] == [8, 9, None, 10]

    # ----------------------------------------------------------------- reasoning_chunk
    # The fake's tokenizer has a plain ChatML template, so it gets the "default" tool format,
    # which (like every format in programs.formats today) has no reasoning parser: no server on
    # the fake, nor on the default model, sends reasoning_chunk. It is produced here by a server
    # of its own whose runtime uses the default format with SGLang's qwen3 reasoning parser, the
    # way a model with thinking would be served.
    async with running_server(cfg, fake) as (addr, app):
        runtime = app.state.server.runtime
        runtime._fmt = dataclasses.replace(runtime.fmt, reasoning_parser="qwen3")
        runtime._renderer = None
        async with websockets.connect(f"ws://{addr}/ws", max_size=None) as ws:
            w2 = Wire(ws)
            fake.replies.append("<think>It is Paris.</think>Paris.")
            r, notes = await w2.call("generate", {"messages": ASK, "tool_choice": "none"}, id="r1")
            reasoning = "".join(n["params"]["text"] for n in notes if n["method"] == "reasoning_chunk")
            assert reasoning == "It is Paris." and r["result"]["text"] == "Paris."
    seen = w.seen | w2.seen

    expected = {f"result:{m}" for m in METHODS} | set(NOTIFICATIONS) | {"stream_end+error", "batch"}
    expected |= {"error:-32700", "error:-32600", "error:-32601", "error:-32602", "error:-32001", "error:-32603"}
    assert expected <= seen, f"never received: {sorted(expected - seen)}"
