"""protocol.client against the real server on the scripted fake backend (no engine: milliseconds).

`fake.replies.append(text)` scripts the next reply, `fake.reply = f(request, prompt_text)` every
reply, `fake.call_text(name, args)` writes a tool call in the model's syntax, and
`fake.token_delay_s` slows the stream.
"""

from __future__ import annotations

import asyncio

import pytest
import websockets

from conftest import running_server
from protocol.client import Client, Generation, connect
from protocol.errors import InvalidParams, SessionNotFound
from protocol.models import FunctionCallRequest, GenerateResult, StreamEnd, TextChunk

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
HI = [{"role": "user", "content": "Say hi."}]
LONG = "alpha answer, which is a good deal longer than the other one"


def url(fake_server: tuple[str, object]) -> str:
    return f"ws://{fake_server[0]}/ws"


async def drain(gen: Generation) -> list[object]:
    return [event async for event in gen]


async def test_server_info(fake_server, fake, cfg):
    async with connect(url(fake_server)) as client:
        info = await client.server_info()
    assert info.protocol_version == 1
    assert info.backend == "fake" and info.model == "fake-chatml"
    assert info.context_length == fake.info.context_length
    assert info.limits["max_tokens_cap"] == cfg.max_tokens_cap
    assert info.limits["default_max_tokens"] == cfg.default_max_tokens


async def test_session_generate_streams_events_in_order_then_the_result(fake_server, fake):
    reply = "Hello there, typed client."
    async with connect(url(fake_server)) as client:
        session = await client.open_session(system_prompt="Be brief.", tools=[WEATHER])
        assert session.prefix_tokens > 0
        fake.replies.append(reply)  # after session.open, whose prefill takes a reply too
        gen = await client.generate(session_id=session.session_id, messages=HI, max_tokens=64)
        events = await drain(gen)
        assert events == gen.events and len(events) >= 2
        *chunks, end = events
        assert all(isinstance(e, TextChunk) for e in chunks) and isinstance(end, StreamEnd)
        assert {e.request_id for e in events} == {gen.request_id}
        assert "".join(c.text for c in chunks) == reply
        result = await gen.result()
        assert isinstance(result, GenerateResult)
        assert result.text == reply and result.finish_reason == end.finish_reason == "stop"
        assert result.tool_calls == [] and result.usage == end.usage
        assert result.usage.prompt_tokens > session.prefix_tokens
        assert result.timings.ttft_ms is not None and result.timings.total_ms >= result.timings.ttft_ms
        assert gen.events == events  # result() after a full iteration adds nothing
        # The second turn of the session is served from the prefix cache.
        again = await (await client.generate(session_id=session.session_id, messages=HI, max_tokens=64)).result()
        assert again.usage.cached_tokens >= result.usage.prompt_tokens
        await client.close_session(session.session_id)
        with pytest.raises(SessionNotFound):
            await client.close_session(session.session_id)
        assert client.unrouted == []


async def test_result_without_iterating_collects_the_events(fake_server, fake):
    fake.replies.append("Just the result.")
    async with connect(url(fake_server)) as client:
        gen = await client.generate(messages=HI)
        for _ in range(500):  # `events` fills as frames arrive, iterated or not
            if gen.stream_end is not None:
                break
            await asyncio.sleep(0.01)
        assert gen.stream_end is not None and len(gen.events) > 1
        result = await gen.result(timeout=30)
        assert result.text == "Just the result."
        assert isinstance(gen.stream_end, StreamEnd) and gen.stream_end.finish_reason == "stop"
        assert "".join(e.text for e in gen.events if isinstance(e, TextChunk)) == result.text


async def test_tool_call_arrives_as_function_call_request(fake_server, fake):
    fake.replies.append(fake.call_text("get_weather", {"city": "Paris"}))
    async with connect(url(fake_server)) as client:
        gen = await client.generate(messages=[{"role": "user", "content": "Weather in Paris?"}],
                                    tools=[WEATHER], tool_choice="required")
        result = await gen.result()
    calls = [e for e in gen.events if isinstance(e, FunctionCallRequest)]
    assert [type(e) for e in gen.events] == [FunctionCallRequest, StreamEnd]
    assert calls[0].name == "get_weather" and calls[0].arguments == {"city": "Paris"}
    assert result.finish_reason == "tool_calls" and result.text == ""
    assert [(c.call_id, c.name, c.arguments) for c in result.tool_calls] == [
        (calls[0].call_id, "get_weather", {"city": "Paris"})]


async def test_two_generates_in_flight_on_one_connection_get_their_own_events(fake_server, fake):
    fake.reply = lambda _request, prompt: LONG if "alpha" in prompt else "beta answer"
    fake.token_delay_s = 0.005
    async with connect(url(fake_server)) as client:
        a = await client.generate(messages=[{"role": "user", "content": "alpha?"}])
        b = await client.generate(messages=[{"role": "user", "content": "beta?"}], id="b-request")
        assert a.request_id != b.request_id == "b-request"
        ra, rb = await asyncio.gather(a.result(timeout=30), b.result(timeout=30))
        assert (ra.text, rb.text) == (LONG, "beta answer")
        for gen, result in ((a, ra), (b, rb)):
            assert {e.request_id for e in gen.events} == {gen.request_id}
            assert "".join(e.text for e in gen.events if isinstance(e, TextChunk)) == result.text
            assert [type(e) for e in gen.events].count(StreamEnd) == 1 and isinstance(gen.events[-1], StreamEnd)
        # Both ran at once: b's stream ended before a's, though a started first.
        assert b.events[-1].timings.total_ms < a.events[-1].timings.total_ms
        assert client.unrouted == []


async def test_cancel_a_running_generate(fake_server, fake):
    fake.token_delay_s = 0.05
    fake.replies.append("This is a long answer that will be cut off well before its end.")
    async with connect(url(fake_server)) as client:
        gen = await client.generate(messages=HI, id="long")
        first = await anext(gen)
        assert isinstance(first, TextChunk) and first.request_id == "long"
        assert await gen.cancel() is True
        result = await gen.result(timeout=30)
        assert result.finish_reason == "cancelled"
        assert gen.stream_end is not None and gen.stream_end.finish_reason == "cancelled"
        assert result.text == "".join(e.text for e in gen.events if isinstance(e, TextChunk))
        assert 0 < len(result.text) < len("This is a long answer that will be cut off well before its end.")
        assert await gen.cancel() is False  # finished now
        assert await client.cancel("no-such-request") is False


async def test_error_answers_raise_the_error_tables_classes(fake_server, fake, cfg):
    async with connect(url(fake_server)) as client:
        gen = await client.generate(session_id="s-does-not-exist", messages=HI)
        with pytest.raises(SessionNotFound) as missing:
            await gen.result()
        assert missing.value.code == -32001 and missing.value.data == {"session_id": "s-does-not-exist"}
        end = gen.stream_end  # the stream_end before the error response stays readable
        assert end is not None and end.finish_reason == "error" and end.error is not None
        assert end.error.code == -32001 and gen.events == [end]
        # Over the server's cap: only the server knows it, so it is its InvalidParams.
        gen = await client.generate(messages=HI, max_tokens=cfg.max_tokens_cap + 1)
        with pytest.raises(InvalidParams) as too_many:
            await gen.result()
        assert too_many.value.code == -32602
        assert [e["field"] for e in too_many.value.data["errors"]] == ["max_tokens"]
        assert gen.stream_end is not None and gen.stream_end.finish_reason == "error"
        # A request the params model refuses fails here: generate() raises instead of returning.
        for bad in ({"messages": []}, {"messages": HI, "colour": "blue"}, {"messages": HI, "max_tokens": "8"}):
            with pytest.raises(InvalidParams) as local:
                await client.generate(**bad)
            assert local.value.data["errors"][0]["field"] in ("messages", "colour", "max_tokens")
        with pytest.raises(InvalidParams):
            await client.open_session(tools=[{"type": "function", "function": {"name": "bad name!"}}])
        # A reused id of a running generate is refused locally too.
        fake.token_delay_s = 0.05
        running = await client.generate(messages=HI, id="dup")
        with pytest.raises(ValueError):
            await client.generate(messages=HI, id="dup")
        assert await running.cancel() is True
        assert (await running.result()).finish_reason == "cancelled"
        # The connection is still usable after all of these.
        assert (await client.server_info()).protocol_version == 1
        assert client.unrouted == []


async def test_raw_api_and_call(fake_server, fake):
    async with connect(url(fake_server)) as client:
        with pytest.raises(TimeoutError):
            await client.recv_raw(0.1)  # nothing unrouted
        await client.send_raw('{"jsonrpc": "2.0", "method": "server.info", "id": "r1"}')
        frame = await client.recv_raw(10)
        assert frame["id"] == "r1" and frame["result"]["protocol_version"] == 1
        await client.send_raw("this is not JSON")
        frame = await client.recv_raw(10)
        assert frame["error"]["code"] == -32700 and frame["id"] is None
        await client.send_raw([{"jsonrpc": "2.0", "method": "server.info", "id": "b1"},
                               {"jsonrpc": "2.0", "method": "nope", "id": "b2"}])
        batch = await client.recv_raw(10)
        assert isinstance(batch, list) and {e["id"] for e in batch} == {"b1", "b2"}
        # call(): (response, the frames before it), the errors in the response.
        resp, before = await client.call("foo.bar")
        assert resp["error"]["code"] == -32601 and before == []
        fake.replies.append("raw reply")
        resp, before = await client.call("generate", {"messages": HI}, id="g1")
        assert resp["id"] == "g1" and resp["result"]["text"] == "raw reply"
        assert [f["method"] for f in before][-1] == "stream_end"
        assert {f["params"]["request_id"] for f in before} == {"g1"}
        # Raw frames and routed ones on one connection: neither steals the other's.
        fake.token_delay_s = 0.005
        fake.reply = lambda _request, prompt: "routed" if "routed" in prompt else "raw"
        await client.send_raw({"jsonrpc": "2.0", "method": "generate", "id": "raw-g",
                               "params": {"messages": [{"role": "user", "content": "raw please"}]}})
        gen = await client.generate(messages=[{"role": "user", "content": "routed please"}])
        assert (await gen.result(timeout=30)).text == "routed"
        frames = []
        while not any(f.get("id") == "raw-g" for f in frames):
            frames.append(await client.recv_raw(30))
        assert all(f.get("id") == "raw-g" or f["params"]["request_id"] == "raw-g" for f in frames)
        assert "".join(f["params"]["text"] for f in frames if f.get("method") == "text_chunk") == "raw"
        assert client.unrouted == []


async def test_unrouted_frames_are_kept(fake_server, fake):
    async with connect(url(fake_server)) as client:
        await client.send_raw({"jsonrpc": "2.0", "method": "server.info", "id": "kept"})
        assert (await client.server_info()).protocol_version == 1  # its answer comes after "kept"'s
        assert [f["id"] for f in client.unrouted] == ["kept"]
        assert (await client.recv_raw(1))["id"] == "kept" and client.unrouted == []


async def test_a_closed_connection_fails_what_is_waiting(fake_server, fake):
    fake.token_delay_s = 0.05
    async with connect(url(fake_server)) as client:
        gen = await client.generate(messages=HI)
        assert isinstance(await anext(gen), TextChunk)
        await client.ws.send(b"\x00binary")  # the server closes with 1003
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await gen.result(timeout=30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1003
        with pytest.raises(websockets.ConnectionClosed):
            await client.recv_raw(5)
        with pytest.raises(websockets.ConnectionClosed):
            await client.server_info()


async def test_api_key_and_headers(cfg, fake):
    async with running_server(cfg.replace(api_key="k-one"), fake) as (addr, _):
        with pytest.raises(websockets.InvalidStatus):
            async with connect(f"ws://{addr}/ws"):
                pass
        async with connect(f"ws://{addr}/ws", api_key="k-one") as client:
            assert (await client.server_info()).backend == "fake"
        async with connect(f"ws://{addr}/ws", headers={"Authorization": "Bearer k-one"}) as client:
            assert isinstance(client, Client) and (await client.server_info()).protocol_version == 1

