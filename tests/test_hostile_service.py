"""Hostile clients against the real server app on a real socket (scripted fake backend): no event
loop stall, no unbounded memory, no orphaned turn, no lost answer.

Every hostile-input test runs inside `stall_probe(addr)` (a second connection timing server.info
round trips) and checks the worst stall, that round trips completed, and that every request it
sent was answered. The remote-backend tests run tiny local HTTP servers (no SGLang worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import threading

import pytest

from conftest import connect, running_server, stall_probe, test_config
from runtime.backends.fake import FakeBackend

STALL_MS = 250
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@contextlib.asynccontextmanager
async def _serving(backend: FakeBackend | None = None, **env: str):
    """A fresh fake backend (or `backend`) behind the real app; yields (addr, server, backend)."""
    backend = backend or FakeBackend()
    await backend.start()
    try:
        async with running_server(test_config(**env), backend) as (addr, app):
            yield addr, app.state.server, backend
    finally:
        await backend.stop()


def _check_probe(probe, what: str) -> None:
    print(f"{what}: worst stall {probe.worst_ms:.1f} ms over {len(probe.round_trips_ms)} round trips")
    assert probe.round_trips_ms, "no server.info round trip completed"
    assert probe.unanswered == 0, f"{probe.unanswered} server.info calls were not answered"
    assert probe.worst_ms < STALL_MS, f"{what}: the event loop stalled {probe.worst_ms:.0f} ms"


def _frame(method: str, params: dict, rid) -> str:
    """A request as ASCII JSON text (lone surrogates escaped, as a hostile client may send them)."""
    return json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": rid}, separators=(",", ":"))


async def _raw_call(c, method: str, params: dict, rid, *, frame: str | None = None) -> tuple[dict, list]:
    """Send a request (or the prepared `frame` of it) and read frames until its response."""
    await c.send(frame or _frame(method, params, rid))
    frames = []
    while True:
        frame = await c.recv(timeout=60)
        if isinstance(frame, dict) and frame.get("id") == rid and "method" not in frame:
            return frame, frames
        frames.append(frame)


def _fields(resp: dict) -> list[str]:
    return [e["field"] for e in resp["error"]["data"]["errors"]]


async def _until(condition, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


def _tokens(fake: FakeBackend, text: str) -> int:
    return len(fake.tokenizer.encode(text, add_special_tokens=False))


class SlowRestart(FakeBackend):
    """A fake engine that stays dead for a while once killed (the supervisor's restart waits),
    so a test sees the death whatever the supervisor's timing."""

    async def restart(self) -> None:
        await asyncio.sleep(2)
        await super().restart()


def _rss() -> int:
    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss


# --------------------------------------------------------------------------- 1. prefix cache


async def test_refused_session_opens_cost_bounded_memory_and_no_stall():
    n = 40

    def big(i: int) -> str:  # ~200 KB, distinct: refused by the characters-against-context bound
        return f"{i:04d} " + "You are an agent. " * 11_000

    def mid(i: int) -> str:  # ~9 KB: under the cheap bound, so rendered (in a worker thread), then refused
        return f"{i:04d} " + "Be brief. " * 900

    async with _serving(FakeBackend(context_length=2048)) as (addr, server, _):
        runtime = server.runtime
        async with connect(addr) as c:
            await c.call("session.open", {"system_prompt": "an accepted prefix", "tools": [WEATHER]})
            for i in range(3):  # the paths once: first-use work (imports, allocations) is not what is measured
                await c.call("session.open", {"system_prompt": big(-i), "tools": [WEATHER]})
                await c.call("session.open", {"system_prompt": mid(-i)})
        before = _rss()  # (a full garbage collection: outside the probe, whose loop it would stall)
        async with stall_probe(addr) as probe, connect(addr) as c:
            answered = 0
            for i in range(n):
                r, _ = await c.call("session.open", {"system_prompt": big(i), "tools": [WEATHER]})
                assert r["error"]["code"] == -32002, r
                assert r["error"]["data"]["limit"] == 2048 and r["error"]["data"]["prompt_tokens"] >= 2048
                answered += 1
            for i in range(n):
                r, _ = await c.call("session.open", {"system_prompt": mid(i)})
                assert r["error"]["code"] == -32002 and r["error"]["data"]["prompt_tokens"] > 2048, r
                answered += 1
        grown = _rss() - before
        _check_probe(probe, "refused session.open")
        assert answered == 2 * n
        print(f"RSS growth after {2 * n} refused session.open (~{n * 0.2 + n * 0.009:.0f} MB of prompts): {grown / 2**20:.1f} MiB")
        # nothing refused is cached; the one accepted prefix is
        assert len(runtime._prefix_cache) == 1 and runtime._prefix_cache.tokens < 2048
        assert len(runtime.sessions) == 1
        assert grown < 16 * 2**20, f"the server grew by {grown / 2**20:.0f} MiB"


def test_the_prefix_cache_is_bounded_by_tokens_and_entries():
    from runtime.prompts import PrefixCache

    cache = PrefixCache(max_entries=3, max_tokens=100)
    for i in range(5):
        cache.put(bytes([i]), list(range(40)))
    assert len(cache) == 2 and cache.tokens == 80  # the token bound evicted the oldest
    assert cache.get(bytes([4])) == list(range(40)) and cache.get(bytes([0])) is None
    cache.put(b"big", list(range(101)))  # larger than the whole cache: not kept
    assert cache.get(b"big") is None
    assert PrefixCache.key("a", []) != PrefixCache.key("b", []) and len(PrefixCache.key("a", [])) == 32


# --------------------------------------------------------------------------- 2. long histories


async def test_long_histories_are_refused_cheaply_or_rendered_off_the_loop():
    # The frames are built before the probe starts: the test's own client shares the process
    # (and its garbage collector) with the server, and its work is not the server's stall.
    many = _frame("generate", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 12_000 + ASK},
                  "many")
    wide = _frame("generate", {"messages": [{"role": "user", "content": "x" * 900}, {"role": "assistant", "content": "y" * 900}] * 500
                               + ASK}, "wide")
    # The server moved the process's long-lived objects out of the collector's way when it
    # started (runtime.server: gc.freeze): parsing a frame of 24,000 small objects no longer
    # starts a full collection over all of them (measured 100-400 ms here before that).
    await _long_histories(many, wide)


async def _long_histories(many: str, wide: str) -> None:
    async with _serving(FakeBackend(context_length=2048)) as (addr, _, _b), stall_probe(addr) as probe, connect(addr) as c:
        # a ~1 MiB frame of tiny messages: refused at its count, before the messages are read
        r, notes = await _raw_call(c, "generate", {}, "many", frame=many)
        assert r["error"]["code"] == -32602 and _fields(r) == ["messages"] and "max_messages" in r["error"]["message"]
        assert [n["method"] for n in notes] == ["stream_end"]
        # under the count, far over the context: refused by characters, before rendering
        r, _ = await _raw_call(c, "generate", {}, "wide", frame=wide)
        assert r["error"]["code"] == -32002 and r["error"]["data"]["limit"] == 2048, r
        # a session turn's new messages are bounded the same way
        sid = (await c.call("session.open", {"system_prompt": "sys"}))[0]["result"]["session_id"]
        r, _ = await c.call("generate", {"session_id": sid, "messages": [{"role": "user", "content": "z" * 500_000}]}, id="new")
        assert r["error"]["code"] == -32002, r
        r, _ = await c.call("generate", {"session_id": sid, "messages": ASK}, id="ok")
        assert r["result"]["finish_reason"] == "stop"
    _check_probe(probe, "long histories (context 2048)")

    async with _serving() as (addr, _, _b), stall_probe(addr) as probe, connect(addr) as c:
        # the most messages allowed, within the context: rendered and tokenized in a worker thread
        pairs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}] * 511
        r, _ = await c.call("generate", {"messages": pairs + ASK, "max_tokens": 4}, id="long")
        assert r["result"]["usage"]["prompt_tokens"] > 5_000, r
    _check_probe(probe, "1023-message history (context 32768)")


# --------------------------------------------------------------------------- 3. stop strings


async def test_stop_strings_are_bounded_in_count_and_length():
    async with _serving(INFERENCE_MAX_STOP_CHARS="16") as (addr, _, _b), stall_probe(addr) as probe, connect(addr) as c:
        r, _ = await c.call("generate", {"messages": ASK, "stop": ["x"] * 17}, id=1)
        assert r["error"]["code"] == -32602 and _fields(r) == ["stop"] and "max_stop_sequences" in r["error"]["message"]
        r, _ = await c.call("generate", {"messages": ASK, "stop": ["ok", "\u0001" * 17]}, id=2)
        assert r["error"]["code"] == -32602 and _fields(r) == ["stop"] and "max_stop_chars" in r["error"]["message"]
        assert "stop.1" in r["error"]["message"]
        r, _ = await c.call("generate", {"messages": ASK, "stop": ["x" * 16] * 16}, id=3)
        assert r["result"]["finish_reason"] == "stop"
    _check_probe(probe, "stop strings")


# --------------------------------------------------------------------------- 4. calls of a failing turn


async def test_calls_of_a_turn_that_fails_are_never_sent():
    async with _serving(SlowRestart()) as (addr, server, fake), stall_probe(addr) as probe, connect(addr) as c:
        sid = (await c.call("session.open", {"system_prompt": "sys", "tools": [WEATHER]}))[0]["result"]["session_id"]
        session = server.runtime.sessions.get(sid, owner="")
        # a valid call, then a second one the format allows no room for: the turn fails
        call = fake.call_text("get_weather", {"city": "Paris"})
        fake.replies.append(call + "\n" + call)
        r, notes = await c.call("generate", {"session_id": sid, "messages": ASK}, id="two")
        assert r["error"]["code"] == -32603 and r["error"]["data"]["reason"] == "invalid_model_output"
        assert [n["method"] for n in notes] == ["stream_end"], notes
        assert session.pending_calls == {} and session.turns == 0
        # a valid call, then the engine dies before the turn ends: nothing was sent either
        fake.replies.append(call + "\n" + "x" * 50)
        fake.token_delay_s, fake.stall_after = 0.001, _tokens(fake, call) + 2
        task = asyncio.create_task(c.call("generate", {"session_id": sid, "messages": ASK}, id="dies"))
        await _until(lambda: fake.stalled)  # the call is complete and parsed; the stream waits after it
        fake.kill()
        r, notes = await task
        assert r["error"]["code"] == -32004, r
        assert [n["method"] for n in notes] == ["stream_end"], notes
        assert session.pending_calls == {} and session.turns == 0
        fake.stall_after, fake.token_delay_s = None, 0.0
        for _ in range(200):  # the supervisor brings the engine back
            if fake.is_ready():
                break
            await asyncio.sleep(0.05)
        # the session is as it was: the client simply retries
        fake.replies.append(call)
        r, notes = await c.call("generate", {"session_id": sid, "messages": ASK}, id="retry")
        assert r["result"]["finish_reason"] == "tool_calls"
        assert [n["method"] for n in notes] == ["function_call_request", "stream_end"]
        call_id = r["result"]["tool_calls"][0]["call_id"]
        assert session.pending_calls == {call_id: "get_weather"}
        r, _ = await c.call("generate", {"session_id": sid, "messages": [
            {"role": "tool", "tool_call_id": call_id, "content": "sunny"}]}, id="answer")
        assert r["result"]["finish_reason"] == "stop"
    _check_probe(probe, "failing tool-call turns")


# --------------------------------------------------------------------------- 5. held-back text


async def _cancel_when_seen(c, fake, sid: str, reply: str, seen: str, **params):
    fake.replies.append(reply)
    fake.stall_after = _tokens(fake, reply)
    rid = f"held-{len(fake.requests)}"
    await c.send({"jsonrpc": "2.0", "method": "generate", "id": rid,
                  "params": {"session_id": sid, "messages": ASK, **params}})
    text, frames = "", []
    while text != seen:
        frame = await c.recv(timeout=30)
        frames.append(frame)
        if frame.get("method") == "text_chunk":
            text += frame["params"]["text"]
            assert seen.startswith(text), text
    await _until(lambda: fake.stalled)  # the whole reply is streamed; the parser holds its tail
    await asyncio.sleep(0.05)
    await c.send({"jsonrpc": "2.0", "method": "cancel", "params": {"request_id": rid}, "id": f"c-{rid}"})
    while not any(f.get("id") == rid for f in frames):
        frames.append(await c.recv(timeout=30))
    fake.stall_after = None
    return next(f for f in frames if f.get("id") == rid), frames


async def test_a_cancelled_or_cut_turn_keeps_exactly_what_the_client_got():
    async with _serving() as (addr, server, fake), stall_probe(addr) as probe, connect(addr) as c:
        sid = (await c.call("session.open", {"system_prompt": "sys", "tools": [WEATHER]}))[0]["result"]["session_id"]
        session = server.runtime.sessions.get(sid, owner="")
        tok = fake.tokenizer

        def kept_since(n: int) -> str:
            return tok.decode(session.token_ids[n:], skip_special_tokens=False)

        # a partial call trigger held back by the parser, then a cancel
        before = len(session.token_ids)
        r, frames = await _cancel_when_seen(c, fake, sid, 'Hello <tool_call>{"name":"get_wea', "Hello ")
        assert r["result"]["finish_reason"] == "cancelled" and r["result"]["text"] == "Hello "
        assert r["result"]["tool_calls"] == []
        prompt = r["result"]["usage"]["prompt_tokens"]
        assert kept_since(before).endswith("assistant\nHello "), kept_since(before)
        assert len(session.token_ids) == prompt + _tokens(fake, "Hello ")
        # a partial end-of-turn marker held back, then a cancel
        before = len(session.token_ids)
        r, _ = await _cancel_when_seen(c, fake, sid, "Fine, thanks.<|im_", "Fine, thanks.")
        assert r["result"]["text"] == "Fine, thanks." and kept_since(before).endswith("assistant\nFine, thanks.")
        # a call cut by max_tokens: the turn ends with 'length' and keeps only the text sent
        before = len(session.token_ids)
        fake.replies.append("Sure. " + fake.call_text("get_weather", {"city": "Paris"}))
        r, notes = await c.call("generate", {"session_id": sid, "messages": ASK, "max_tokens": 20}, id="cut")
        assert r["result"]["finish_reason"] == "length" and r["result"]["text"] == "Sure. "
        assert "".join(n["params"]["text"] for n in notes if n["method"] == "text_chunk") == "Sure. "
        assert kept_since(before).endswith("assistant\nSure. ")
        # the next turn closes the cut one and goes on from exactly there
        before = len(session.token_ids)
        r, _ = await c.call("generate", {"session_id": sid, "messages": ASK}, id="next")
        assert r["result"]["finish_reason"] == "stop"
        assert kept_since(before).startswith("<|im_end|>")
    _check_probe(probe, "held-back text")


# --------------------------------------------------------------------------- 6. warm-ups


@pytest.mark.parametrize("hang", [False, True], ids=["stream-fails", "stream-hangs"])
async def test_session_open_ends_with_32004_when_the_engine_dies_during_warm_up(hang):
    fake = SlowRestart(token_delay_s=0.3)
    fake.hang_when_killed = hang
    async with _serving(fake) as (addr, server, _), stall_probe(addr) as probe, connect(addr) as c:
        open_ = asyncio.create_task(c.call("session.open", {"system_prompt": "You are slow to warm."}, timeout=10))
        for _ in range(100):
            if fake.inflight():
                break
            await asyncio.sleep(0.01)
        assert fake.inflight() == 1 and server.runtime.active == 1  # the warm-up is counted
        fake.kill()
        r, _ = await open_
        assert r["error"]["code"] == -32004, r
        assert len(server.runtime.sessions) == 0 and server.runtime.active == 0
    _check_probe(probe, f"engine death during warm-up ({'hangs' if hang else 'fails'})")


async def test_warm_ups_count_against_the_engine_queue():
    fake = FakeBackend(token_delay_s=0.3)
    async with (_serving(fake, INFERENCE_MAX_QUEUE="1") as (addr, server, _), stall_probe(addr) as probe,
                connect(addr) as c, connect(addr) as c2):
        first = asyncio.create_task(c2.call("session.open", {"system_prompt": "one"}, id="first", timeout=30))
        for _ in range(100):
            if server.runtime.active:
                break
            await asyncio.sleep(0.01)
        r, _ = await c.call("session.open", {"system_prompt": "two"}, id="second", timeout=30)
        assert r["error"]["code"] == -32000 and "queue" in r["error"]["message"]
        assert "result" in (await first)[0]
        assert len(server.runtime.sessions) == 1
    _check_probe(probe, "warm-ups against max_queue")


# --------------------------------------------------------------------------- 8. lone surrogates


async def test_lone_surrogates_are_invalid_params_naming_the_field():
    async with _serving() as (addr, _, _b), stall_probe(addr) as probe, connect(addr) as c:
        cases = [
            ("generate", {"messages": [{"role": "user", "content": "bad \ud800 text"}]}, "messages.0.content"),
            ("generate", {"messages": ASK, "system_prompt": "\udfff"}, "system_prompt"),
            ("generate", {"messages": ASK, "stop": ["\ud801"]}, "stop.0"),
            ("session.open", {"system_prompt": "x\ud800"}, "system_prompt"),
            ("session.open", {"tools": [{"type": "function", "function": {"name": "f", "description": "\udc00"}}]},
             "tools.0.function.description"),
            ("session.open", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
                "type": "object", "properties": {"a": {"type": "string", "description": "\ud800"}}}}}]},
             "tools.0.function.parameters"),
        ]
        for i, (method, params, field) in enumerate(cases):
            r, _ = await _raw_call(c, method, params, i)
            assert r["error"]["code"] == -32602 and _fields(r) == [field], r
            message = r["error"]["data"]["errors"][0]["message"]
            # (pydantic itself refuses one in a length-checked string before our validator runs)
            assert "surrogate" in message or "unicode" in message, message
        r, _ = await c.call("generate", {"messages": ASK}, id="after")
        assert r["result"]["finish_reason"] == "stop"
    _check_probe(probe, "lone surrogates")


# --------------------------------------------------------------------------- 9. tool sets


async def test_tool_sets_are_bounded_in_bytes_and_checked_off_the_loop(monkeypatch):
    import programs

    threads: list[str] = []
    check = programs.check_tools

    def recording(tools, **kwargs):
        threads.append(threading.current_thread().name)
        return check(tools, **kwargs)

    monkeypatch.setattr(programs, "check_tools", recording)
    async with _serving(INFERENCE_MAX_TOOLS_BYTES="65536") as (addr, _, _b), stall_probe(addr) as probe, connect(addr) as c:
        big = [{"type": "function", "function": {"name": f"t{i}", "description": "d" * 9000}} for i in range(8)]
        for rid, (method, params) in enumerate([("session.open", {"tools": big}),
                                                ("generate", {"messages": ASK, "tools": big})]):
            r, _ = await c.call(method, params, id=rid)
            assert r["error"]["code"] == -32602 and _fields(r) == ["tools"], r
            assert "max_tools_bytes" in r["error"]["message"]
        assert threads == [], "the schema check ran on a tool set over the size bound"
        r, _ = await c.call("session.open", {"tools": [WEATHER]}, id="ok")
        assert "result" in r
        assert threads and threading.main_thread().name not in threads
    _check_probe(probe, "large tool sets")


# --------------------------------------------------------------------------- 7. remote backends


@contextlib.asynccontextmanager
async def _serve(app):
    """`app` on a free loopback port (uvicorn, this event loop); yields its base URL."""
    import uvicorn

    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    srv.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    task = asyncio.create_task(srv.serve())
    while not srv.started:
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"
    finally:
        srv.should_exit = True
        await asyncio.wait_for(task, timeout=10)


def _misbehaving_app():
    """An OpenAI-compatible and SGLang-native server whose streams misbehave on request: the
    last user message (or the first input id) says how."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    def chunk(text: str) -> str:
        body = {"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
        return f"data: {json.dumps(body)}\n\n"

    def misbehave(how: str, first: str):
        if how == "error":
            return Response("E" * 5_000_000, status_code=500)  # a huge error body

        async def stream():
            yield first
            if how == "stall":
                await asyncio.sleep(3600)  # the connection stays open, nothing more comes
            else:
                yield "data: "
                while True:  # one line that never ends
                    yield "x" * 65536
                    await asyncio.sleep(0)

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def models(_):
        return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model", "max_model_len": 4096}]})

    async def health(_):
        return JSONResponse({})

    async def chat(request):
        body = await request.json()
        return misbehave(body["messages"][-1]["content"], chunk("Hello"))

    async def generate(request):
        body = await request.json()
        how = {1: "stall", 2: "endless", 3: "error"}[body["input_ids"][0]]
        first = {"text": "Hi", "output_ids": [5], "meta_info": {"prompt_tokens": 1, "completion_tokens": 1, "cached_tokens": 0,
                                                                 "finish_reason": None}}
        return misbehave(how, f"data: {json.dumps(first)}\n\n")

    return Starlette(routes=[Route("/v1/models", models), Route("/health", health), Route("/abort_request", health, methods=["POST"]),
                             Route("/v1/chat/completions", chat, methods=["POST"]), Route("/generate", generate, methods=["POST"])])


async def test_a_stalled_or_endless_remote_stream_ends_the_turn_in_bounded_time_and_memory():
    import time

    from runtime.backends.openai_http import OpenAIBackend

    async with _serve(_misbehaving_app()) as url:
        rcfg = test_config(INFERENCE_BACKEND="openai", INFERENCE_BACKEND_URLS=url + "/v1")
        backend = OpenAIBackend(rcfg, read_timeout_s=0.5, max_line_bytes=256 * 1024)
        await backend.start()
        try:
            async with running_server(rcfg, backend) as (addr, _), stall_probe(addr) as probe, connect(addr) as c:
                t0 = time.perf_counter()
                r, notes = await c.call("generate", {"messages": [{"role": "user", "content": "stall"}]}, id="stall", timeout=30)
                took = time.perf_counter() - t0
                assert r["error"]["code"] == -32004 and "read deadline" in r["error"]["message"], r
                assert [n["method"] for n in notes] == ["text_chunk", "stream_end"] and took < 5, (notes, took)
                r, notes = await c.call("generate", {"messages": [{"role": "user", "content": "endless"}]}, id="endless", timeout=30)
                assert r["error"]["code"] == -32603 and "MAX_LINE_BYTES" in r["error"]["message"], r
                r, notes = await c.call("generate", {"messages": [{"role": "user", "content": "error"}]}, id="error", timeout=30)
                assert r["error"]["code"] == -32603 and "HTTP 500" in r["error"]["message"], r
                assert len(r["error"]["message"]) < 1000
            _check_probe(probe, "misbehaving OpenAI-compatible server")
            print(f"stalled stream ended after {took:.2f} s (read deadline 0.5 s)")
        finally:
            await backend.stop()


async def test_sglang_streams_have_a_read_deadline_and_a_line_bound():
    import httpx

    from runtime.backends.base import BackendError, BackendUnavailable, GenRequest, Sampling
    from runtime.backends.http import Health, stream_timeout
    from runtime.backends.sglang_http import SGLangBackend

    async with _serve(_misbehaving_app()) as url:
        b = SGLangBackend(test_config(INFERENCE_BACKEND="sglang", INFERENCE_BACKEND_URLS=url), read_timeout_s=0.5,
                          max_line_bytes=256 * 1024)
        # the stream path alone (start() would load the served model's tokenizer)
        b._client = httpx.AsyncClient(timeout=stream_timeout(b.read_timeout_s))
        b._health = Health(b._client, {url: "/health"}, interval_s=3600)
        b._started, b.worker_urls = True, [url]
        try:
            for first, error, words in ((1, BackendUnavailable, "read deadline"), (2, BackendError, "MAX_LINE_BYTES"),
                                        (3, BackendError, "HTTP 500")):
                updates = []
                with pytest.raises(error, match=words):
                    async for u in b.stream(GenRequest(rid=f"r{first}", input_ids=[first, 7], sampling=Sampling(max_new_tokens=4))):
                        updates.append(u)
                assert [u.text for u in updates] == ([] if first == 3 else ["Hi"])
        finally:
            await b.stop()


# --------------------------------------------------------------------------- long arguments


NOTE_TOOL = [{"type": "function", "function": {
    "name": "write_note", "description": "Write a note.",
    "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}]


def test_the_streaming_parser_feeds_a_long_argument_in_few_pieces(fake_backend) -> None:
    """The detectors re-parse their whole buffer on every feed: a 16k-character argument fed once
    per token was quadratic (about 20 s). Runs of plain characters inside a call are fed whole."""
    import programs

    fmt = programs.format_for(fake_backend.tokenizer)
    program = programs.ToolProgram(fmt, programs.check_tools(NOTE_TOOL), tool_choice="required")
    parser = programs.StreamParser(program)
    fed: list[str] = []
    detector_feed = parser._fcp.parse_stream_chunk

    def counting(piece):
        fed.append(piece)
        return detector_feed(piece)

    parser._fcp.parse_stream_chunk = counting
    text = fmt.call_text("write_note", {"text": "a" * 16_000})
    events = []
    for i in range(0, len(text), 3):  # a token of about three characters at a time
        events += parser.feed(text[i:i + 3])
    events += parser.finish()
    calls = [e for e in events if isinstance(e, programs.ToolCallEvent)]
    assert [len(c.arguments["text"]) for c in calls] == [16_000]
    assert len(fed) < 100, f"{len(fed)} detector feeds for one call"


async def test_a_long_tool_argument_streams_without_stalling_the_loop() -> None:
    backend = FakeBackend()  # one token per byte: the 16k-character call is about 16k tokens
    async with _serving(backend, INFERENCE_MAX_TOKENS_CAP="20000") as (addr, _server, fake):
        call = fake.call_text("write_note", {"text": "a" * 16_000})
        async with stall_probe(addr) as probe, connect(addr) as c:
            opened, _ = await c.call("session.open", {"tools": NOTE_TOOL})
            fake.replies.append(call)
            resp, notes = await c.call("generate", {"session_id": opened["result"]["session_id"], "tool_choice": "required",
                                                    "max_tokens": 17_000, "messages": ASK}, id="long-args", timeout=120)
        _check_probe(probe, "16k-character argument")
        assert resp["result"]["finish_reason"] == "tool_calls"
        assert [len(c["arguments"]["text"]) for c in resp["result"]["tool_calls"]] == [16_000]
        assert [n["method"] for n in notes][-2:] == ["function_call_request", "stream_end"]


# --------------------------------------------------------------------------- schema branches


def _branchy_tool(n: int) -> list[dict]:
    return [{"type": "function", "function": {"name": "pick", "description": "Pick one.", "parameters": {
        "type": "object", "required": ["choice"],
        "properties": {"choice": {"oneOf": [{"const": i} for i in range(n)]}}}}}]


async def test_a_schema_with_too_many_branches_is_refused_before_the_pairwise_check() -> None:
    """A 1,600-branch oneOf (25 KB) froze every connection for 8.6 s: the disjointness check
    compares every pair of branches. Now the branches are counted first (max_schema_branches)."""
    async with _serving() as (addr, _server, _fake), stall_probe(addr) as probe, connect(addr) as c:
        big, _ = await c.call("session.open", {"tools": _branchy_tool(1600)}, id="big")
        at_limit, _ = await c.call("session.open", {"tools": _branchy_tool(64)}, id="at-limit")
        stateless, notes = await c.call("generate", {"tools": _branchy_tool(800), "messages": ASK}, id="stateless")
    _check_probe(probe, "1,600-branch oneOf")
    for reply in (big, stateless):
        err = reply["error"]
        assert err["code"] == -32602 and "max_schema_branches" in err["message"], err
    assert "session_id" in at_limit["result"]  # 64 disjoint branches: accepted and enforced
    assert [n["method"] for n in notes] == ["stream_end"]
