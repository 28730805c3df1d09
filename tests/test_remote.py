"""Remote backends: `cluster 2` (2 SGLang workers + sglang-router + the runtime as a subprocess),
the same workers without the router, and one worker's OpenAI-compatible API.

One cluster is started for the module (about 2 minutes on 2 cores) and serves three ways:
    router   the runtime subprocess that `python -m runtime.cluster` starts (INFERENCE_BACKEND=sglang,
             URL = the router): the whole `./launch.sh cluster N` path
    workers  an in-process runtime with INFERENCE_BACKEND=sglang and both worker URLs (no router)
    openai   an in-process runtime with INFERENCE_BACKEND=openai on worker 1's /v1/chat/completions
The protocol tests of test_server.py run against each of them, then the session tests here. The
fast tests at the end need no engine: PrefixAffinity, a fake OpenAI-compatible server, and what
an unreachable backend does at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os

import httpx
import pytest
import pytest_asyncio

import test_server as _shared
from conftest import connect, running_server, test_config

# The protocol tests of test_server.py, collected here a second time, run against each remote
# backend (this module's `server` / `backend` and `rpc_server` / `rpc_backend` fixtures replace
# the embedded engine's and the fake backend's).
SHARED_TESTS = (
    "test_stateless_generate_streams_then_ends_once",
    "test_length_finish",
    "test_cancel_while_info_is_answered",
    "test_disconnect_mid_stream_aborts_engine_work",
    "test_invalid_params_name_the_field",
)


def _on_the_cluster(test):
    """A copy of a shared test with the engine marker. A copy: marking test_server's own
    function would mark it there too, and take its fake-backend tests out of the fast suite."""

    @functools.wraps(test)
    async def copy(*args, **kwargs):
        return await test(*args, **kwargs)

    return pytest.mark.engine(copy)


for _name in SHARED_TESTS:
    if hasattr(_shared, _name):
        globals()[_name] = _on_the_cluster(getattr(_shared, _name))

# An enum-only tool: a forced call of it is valid whatever the model knows. (The default model's
# own chat template has no tools, so through the OpenAI API the model never sees them.)
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "Current local time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "JST"]}},
                   "required": ["zone"], "additionalProperties": False}}}
SYSTEM = "You are a concise assistant. You can look up the time with the get_time tool. " * 3


class WorkerLoads:
    """`backend.engine_requests()` for the shared tests: requests the workers hold (/v1/loads)."""

    def __init__(self, urls: list[str]):
        self.urls = urls

    async def engine_requests(self) -> int:
        total = 0
        async with httpx.AsyncClient(timeout=30) as http:
            for url in self.urls:
                for load in (await http.get(url + "/v1/loads")).json()["loads"]:
                    total += load["num_running_reqs"] + load["num_waiting_reqs"]
        return total


# --------------------------------------------------------------------------- fixtures


@pytest_asyncio.fixture(scope="module")
async def cluster(cfg, tmp_path_factory):
    from runtime.cluster import Cluster, free_port

    c = Cluster(cfg.replace(kv_cache_tokens=16384), 2, with_runtime=True, runtime_port=free_port(),
                log_dir=tmp_path_factory.mktemp("cluster"), progress=lambda m: print(f"cluster: {m}", flush=True))
    await asyncio.to_thread(c.start)
    try:
        yield c
    finally:
        await asyncio.to_thread(c.stop)
        assert c.alive_groups() == [], "processes of the cluster outlived stop()"


@pytest_asyncio.fixture(scope="module", params=["router", "workers", "openai"])
async def remote(request, cluster):
    """(kind, ws address, app or None, load probe) for each way of reaching the cluster."""
    kind = request.param
    if kind == "router":
        yield kind, cluster.runtime_addr, None, WorkerLoads(cluster.worker_urls)
        return
    from runtime.backends import make_backend

    if kind == "workers":
        rcfg = test_config(INFERENCE_BACKEND="sglang", INFERENCE_BACKEND_URLS=",".join(cluster.worker_urls))
        probe = WorkerLoads(cluster.worker_urls)
    else:
        rcfg = test_config(INFERENCE_BACKEND="openai", INFERENCE_BACKEND_URLS=cluster.worker_urls[0])
        probe = WorkerLoads(cluster.worker_urls[:1])
    backend = make_backend(rcfg)
    await backend.start()
    try:
        async with running_server(rcfg, backend) as (addr, app):
            yield kind, addr, app, probe
    finally:
        await backend.stop()


@pytest.fixture(scope="module")
def server(remote):
    return remote[1], remote[2]


@pytest.fixture(autouse=True)
def _shared_tests_on_router_and_openai(request):
    # The bare-workers path differs from the router's only in who picks the worker; the session
    # tests below cover it. The shared protocol tests run twice, not three times (CI time).
    if request.node.originalname in SHARED_TESTS and "[workers]" in request.node.name:
        pytest.skip("protocol tests run on router and openai; workers run the session tests")


@pytest.fixture(scope="module")
def backend(remote):
    return remote[3]


@pytest.fixture(scope="module")
def rpc_server(server):
    return server


@pytest.fixture(scope="module")
def rpc_backend(backend):
    return backend


# --------------------------------------------------------------------------- sessions on the cluster


async def _turn(c, params, usage_log):
    resp, notes = await c.call("generate", params, timeout=600)
    assert [n["method"] for n in notes].count("stream_end") == 1 and notes[-1]["method"] == "stream_end"
    assert "result" in resp, resp
    result = resp["result"]
    assert notes[-1]["params"]["usage"] == result["usage"]
    usage_log.append(result["usage"])
    return result, notes


@pytest.mark.engine
async def test_server_info_names_the_backend(remote):
    kind, addr, _, _ = remote
    async with connect(addr) as c:
        info = (await c.call("server.info"))[0]["result"]
    assert info["backend"] == ("openai" if kind == "openai" else "sglang")
    assert info["context_length"] == 8192
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"http://{addr}/ready")).status_code == 200


@pytest.mark.engine
async def test_session_tool_call_then_results_with_cache_hits(remote):
    """A three-turn agent session: forced call, tool result, user follow-up; cached_tokens per turn."""
    kind, addr, _, _ = remote
    usage: list[dict] = []
    async with connect(addr) as c:
        opened = (await c.call("session.open", {"system_prompt": SYSTEM, "tools": [TIME_TOOL]}))[0]["result"]
        sid = opened["session_id"]
        first, notes = await _turn(c, {"session_id": sid, "messages": [{"role": "user", "content": "What time is it in Paris?"}],
                                      "tool_choice": {"type": "function", "function": {"name": "get_time"}}, "max_tokens": 48}, usage)
        calls = [n["params"] for n in notes if n["method"] == "function_call_request"]
        # Through the router this needs the constraint to arrive: sglang-router drops
        # sampling_params.structural_tag, so the backend sends it as EBNF (without that, the
        # model answers this in free text).
        assert first["finish_reason"] == "tool_calls" and len(calls) == 1 == len(first["tool_calls"])
        if kind != "openai":
            assert first["text"] == "" and [n["method"] for n in notes] == ["function_call_request", "stream_end"]
        call = calls[0]
        assert call["name"] == "get_time" and call["arguments"]["zone"] in ("UTC", "CET", "JST")
        assert {k: call[k] for k in ("call_id", "name", "arguments")} == first["tool_calls"][0]
        second, notes = await _turn(c, {"session_id": sid, "max_tokens": 12, "tool_choice": "none",
                                       "messages": [{"role": "tool", "tool_call_id": call["call_id"], "content": "14:05"}]}, usage)
        assert second["finish_reason"] in ("stop", "length")
        assert "".join(n["params"]["text"] for n in notes if n["method"] == "text_chunk") == second["text"]
        await _turn(c, {"session_id": sid, "max_tokens": 8, "tool_choice": "none",
                        "messages": [{"role": "user", "content": "Thanks. And in Tokyo?"}]}, usage)
        # The tool result must answer a call of the last turn: the session knows its calls.
        bad, _ = await c.call("generate", {"session_id": sid, "messages": [{"role": "tool", "tool_call_id": "call_nope", "content": "x"}]})
        assert bad["error"]["code"] == -32602
        assert (await c.call("session.close", {"session_id": sid}))[0]["result"] == {"closed": True}
    print(f"\n[{kind}] prefix_tokens={opened['prefix_tokens']} usage per turn: "
          + "; ".join(f"turn {i + 1}: {u['cached_tokens']}/{u['prompt_tokens']} cached, {u['completion_tokens']} out"
                      for i, u in enumerate(usage)))
    for u in usage:
        assert 0 <= u["cached_tokens"] <= u["prompt_tokens"]
    if kind == "openai":
        # The server re-renders the whole history each turn; its radix cache still finds the
        # part of the new prompt that it computed before (at least the system prompt).
        assert usage[1]["cached_tokens"] > 0 and usage[2]["cached_tokens"] > 0
        return
    # Token level: the prefix was warmed at session.open, and every later turn's prompt extends
    # the previous one token for token on the same worker (router cache_aware / prefix affinity):
    # all of it is cached but the one last sampled token, which has no KV yet.
    assert usage[0]["cached_tokens"] >= opened["prefix_tokens"] - 1
    for prev, cur in zip(usage, usage[1:], strict=False):
        assert cur["cached_tokens"] >= prev["prompt_tokens"] + prev["completion_tokens"] - 1


@pytest.mark.engine
async def test_sessions_with_one_agent_definition_share_the_prefix(remote):
    kind, addr, _, _ = remote
    if kind == "openai":
        pytest.skip("an OpenAI-compatible server is sent messages; prefix_tokens is not known here")
    async with connect(addr) as c:
        a = (await c.call("session.open", {"system_prompt": SYSTEM + " Shared.", "tools": [TIME_TOOL]}))[0]["result"]
        b = (await c.call("session.open", {"system_prompt": SYSTEM + " Shared.", "tools": [TIME_TOOL]}))[0]["result"]
        assert a["prefix_tokens"] == b["prefix_tokens"] > 0
        result, _ = await _turn(c, {"session_id": b["session_id"], "max_tokens": 4, "tool_choice": "none",
                                    "messages": [{"role": "user", "content": "Hello"}]}, [])
        # The second session's first turn lands where the shared prefix is cached.
        assert result["usage"]["cached_tokens"] >= b["prefix_tokens"] - 1


# --------------------------------------------------------------------------- no engine


def test_prefix_affinity_keeps_a_session_on_its_worker():
    from runtime.backends.sglang_http import PrefixAffinity

    aff = PrefixAffinity(block=4)
    workers = ["http://a", "http://b"]
    prefix = list(range(100, 140))
    s1 = prefix + [1, 2, 3, 4, 5, 6, 7, 8]
    first = aff.pick(s1, workers, {})
    aff.record(s1, first)
    # The same session's next turn extends its prompt: same worker, even if the other is idle.
    s1_next = s1 + [9, 10, 11, 12, 13, 14, 15, 16]
    assert aff.pick(s1_next, workers, {first: 1}) == first
    # A prompt that shares too little goes to the least loaded worker.
    other = next(w for w in workers if w != first)
    assert aff.pick(list(range(500, 560)), workers, {first: 1}) == other
    # An overloaded owner loses the request to the least loaded worker.
    assert aff.pick(s1_next, workers, {first: 20, other: 0}) == other
    # Deterministic: same history, same answer.
    assert aff.pick(s1_next, workers, {}) == aff.pick(s1_next, workers, {})


async def test_unreachable_backend_is_a_clear_error_at_start():
    from runtime.backends.base import BackendUnavailable
    from runtime.backends.openai_http import OpenAIBackend
    from runtime.backends.sglang_http import SGLangBackend
    from runtime.cluster import free_port

    url = f"http://127.0.0.1:{free_port()}"
    for cls, kind in ((SGLangBackend, "sglang"), (OpenAIBackend, "openai")):
        b = cls(test_config(INFERENCE_BACKEND=kind, INFERENCE_BACKEND_URLS=url), start_timeout_s=1)
        with pytest.raises(BackendUnavailable, match=url):
            await b.start()
        assert not b.is_ready()
    # In the server: /ready says why (and `python -m runtime` exits 1 with that message).
    rcfg = test_config(INFERENCE_BACKEND="sglang", INFERENCE_BACKEND_URLS=url)
    async with running_server(rcfg, SGLangBackend(rcfg, start_timeout_s=1)) as (addr, _):
        async with httpx.AsyncClient() as http:
            for _ in range(100):
                ready = await http.get(f"http://{addr}/ready")
                if "error" in ready.json():
                    break
                await asyncio.sleep(0.1)
    assert ready.status_code == 503 and url in ready.json()["error"]


# A fake OpenAI-compatible server: the chat path's mapping (streamed tool_calls deltas -> one
# validated function_call_request, usage.prompt_tokens_details.cached_tokens, history resent as
# messages, cancel closing the stream) without a model.

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}}}


def _fake_openai_app(seen: list[dict], disconnected: list[str]):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def chunk(delta=None, finish=None, usage=None):
        body = {"id": "x", "object": "chat.completion.chunk", "model": "fake",
                "choices": [] if delta is None and finish is None else [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}
        if usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    async def models(_):
        return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model", "max_model_len": 4096}]})

    async def chat(request):
        body = await request.json()
        seen.append(body)
        last = body["messages"][-1]["content"] or ""
        usage = {"prompt_tokens": 40 + 10 * len(body["messages"]), "completion_tokens": 7,
                 "prompt_tokens_details": {"cached_tokens": 30 if len(body["messages"]) > 2 else 0}}

        async def stream():
            if last.startswith("call"):
                args = '{"city": "Paris"}' if last == "call" else '{"city": 5}'
                yield chunk({"role": "assistant", "content": None})
                yield chunk({"tool_calls": [{"index": 0, "id": "srv_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]})
                for piece in (args[:5], args[5:11], args[11:]):
                    yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
                yield chunk(finish="tool_calls")
            elif last == "slow":
                try:
                    for i in range(200):
                        yield chunk({"content": f"w{i} "})
                        await asyncio.sleep(0.05)
                finally:
                    disconnected.append("slow")
                yield chunk(finish="length")
            else:
                for piece in ("It is ", "sunny", "."):
                    yield chunk({"content": piece})
                yield chunk(finish="stop")
            yield chunk(usage=usage)
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def health(_):
        return JSONResponse({})

    return Starlette(routes=[Route("/v1/models", models), Route("/health", health),
                             Route("/v1/chat/completions", chat, methods=["POST"])])


@contextlib.asynccontextmanager
async def _serve(app):
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


async def test_openai_chat_path_against_a_fake_server():
    from runtime.backends.openai_http import OpenAIBackend

    seen: list[dict] = []
    disconnected: list[str] = []
    async with _serve(_fake_openai_app(seen, disconnected)) as url:
        rcfg = test_config(INFERENCE_BACKEND="openai", INFERENCE_BACKEND_URLS=url + "/v1")
        backend = OpenAIBackend(rcfg)
        await backend.start()
        assert backend.model == "fake-model" and backend.info.context_length == 4096
        try:
            async with running_server(rcfg, backend) as (addr, _):
                async with connect(addr) as c:
                    sid = (await c.call("session.open", {"system_prompt": "Be brief.", "tools": [WEATHER]}))[0]["result"]["session_id"]
                    # 1. streamed tool_calls deltas -> one complete, parsed call
                    resp, notes = await c.call("generate", {"session_id": sid, "messages": [{"role": "user", "content": "call"}],
                                                            "tool_choice": "required"})
                    r = resp["result"]
                    assert [n["method"] for n in notes] == ["function_call_request", "stream_end"]
                    call = notes[0]["params"]
                    assert call["name"] == "get_weather" and call["arguments"] == {"city": "Paris"}
                    assert r["finish_reason"] == "tool_calls" and r["tool_calls"] == [{k: call[k] for k in ("call_id", "name", "arguments")}]
                    assert r["usage"] == {"prompt_tokens": 60, "cached_tokens": 0, "completion_tokens": 7}
                    sent = seen[-1]
                    assert sent["stream"] is True and sent["tool_choice"] == "required"
                    assert sent["tools"][0]["function"]["strict"] is True
                    # 2. the tool result: the whole history goes back, the call in OpenAI shape
                    resp, notes = await c.call("generate", {"session_id": sid, "messages": [
                        {"role": "tool", "tool_call_id": call["call_id"], "content": "sunny"}]})
                    r = resp["result"]
                    assert "".join(n["params"]["text"] for n in notes if n["method"] == "text_chunk") == r["text"] == "It is sunny."
                    assert r["finish_reason"] == "stop" and r["usage"]["cached_tokens"] == 30
                    msgs = seen[-1]["messages"]
                    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool"]
                    assert msgs[2]["tool_calls"][0]["id"] == call["call_id"] == msgs[3]["tool_call_id"]
                    assert json.loads(msgs[2]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
                    # 3. arguments against the schema: an invalid call is an error, never a call, and
                    # the failed turn is not kept in the session's history
                    resp, notes = await c.call("generate", {"session_id": sid, "messages": [{"role": "user", "content": "call-bad"}]})
                    assert resp["error"]["code"] == -32603 and resp["error"]["data"]["reason"] == "invalid_model_output"
                    assert [n["method"] for n in notes] == ["stream_end"] and notes[0]["params"]["finish_reason"] == "error"
                    await c.call("generate", {"session_id": sid, "messages": [{"role": "user", "content": "hi"}]})
                    assert [m["content"] for m in seen[-1]["messages"] if m["role"] == "user"] == ["call", "hi"]
                    # 4. cancel closes the HTTP stream
                    await c.send({"jsonrpc": "2.0", "id": "s", "method": "generate",
                                  "params": {"messages": [{"role": "user", "content": "slow"}]}})
                    assert (await c.recv())["method"] == "text_chunk"
                    await c.send({"jsonrpc": "2.0", "id": "c", "method": "cancel", "params": {"request_id": "s"}})
                    frames = []
                    while not any(f.get("id") == "s" for f in frames):
                        frames.append(await c.recv())
                    end = [f for f in frames if f.get("method") == "stream_end"]
                    assert len(end) == 1 and end[0]["params"]["finish_reason"] == "cancelled"
                    for _ in range(50):
                        if disconnected:
                            break
                        await asyncio.sleep(0.1)
                    assert disconnected == ["slow"], "the server kept streaming after cancel"
        finally:
            await backend.stop()


# A fake cluster: each child serves 200 on every GET and holds a helper process in its group
# (as SGLang's scheduler and detokenizer are), to test the launcher's lifecycle in seconds.
_FAKE_CHILD = """
import http.server, subprocess, sys
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_cluster_stops_everything_when_a_child_dies(cfg, tmp_path):
    import signal
    import sys
    import threading

    from runtime.cluster import Child, Cluster

    class FakeCluster(Cluster):
        def _plan(self, model_path):
            ports = [*self.worker_ports, self.router_port]
            names = [f"worker {i + 1}/{self.n}" for i in range(self.n)] + ["router"]
            return [Child(name, [sys.executable, "-c", _FAKE_CHILD, str(port)], f"http://127.0.0.1:{port}", "/health",
                          self.log_dir / f"{i}.log") for i, (name, port) in enumerate(zip(names, ports, strict=True))]

    messages: list[str] = []
    c = FakeCluster(cfg, 2, with_runtime=False, log_dir=tmp_path, progress=messages.append)
    c.start(timeout_s=60)
    assert any(m.startswith("ready: 2 workers") for m in messages)
    assert len(c.alive_groups()) == 3
    os.kill(c.children[1].proc.pid, signal.SIGKILL)  # worker 2 dies
    assert c.wait(poll_s=0.1) == 1
    assert any("worker 2/2 exited" in m for m in messages)
    assert c.alive_groups() == [], "the other children and their helpers must be gone"

    # A stop request (SIGINT/SIGTERM in the CLI) ends wait() with 0, and everything stops.
    c = FakeCluster(cfg, 1, with_runtime=False, log_dir=tmp_path / "2", progress=messages.append)
    c.start(timeout_s=60)
    threading.Timer(0.5, c.request_stop).start()
    assert c.wait(poll_s=0.1) == 0
    c.stop()
    assert c.alive_groups() == []
