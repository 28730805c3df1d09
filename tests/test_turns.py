"""Behaviours of the runtime's service and token turn, on the scripted fake backend over the real
socket: the prefix warm-up follows the radix cache, invalid model calls fail the turn and are
counted, and multi-byte text streams through a byte-level detokenizer exactly once."""

from __future__ import annotations

import re

import httpx

from conftest import connect, running_server
from runtime.backends.fake import FakeBackend
from runtime.metrics import METRICS

SYSTEM = "You are a weather bot. Answer briefly."
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
INVALID_CALLS = "agent_runtime_invalid_tool_calls_total"


async def test_session_open_warms_the_prefix_only_with_a_radix_cache(cfg):
    for radix in (False, True):
        backend = FakeBackend(radix_cache=radix)
        await backend.start()
        try:
            async with running_server(cfg, backend) as (addr, _), connect(addr) as c:
                before = len(backend.requests)
                opened, _ = await c.call("session.open", {"system_prompt": SYSTEM, "tools": [WEATHER]})
                prefix = opened["result"]["prefix_tokens"]
                warmups = backend.requests[before:]
                if not radix:
                    # Nothing would keep what a warm-up computes: it would only cost a prefill.
                    assert warmups == [], "session.open sent a warm-up to a backend without a radix cache"
                else:
                    assert len(warmups) == 1, "session.open did not warm the prefix"
                    assert len(warmups[0].input_ids) == prefix and warmups[0].sampling.max_new_tokens == 1
                r, _ = await c.call("generate", {"session_id": opened["result"]["session_id"], "messages": ASK})
                cached = r["result"]["usage"]["cached_tokens"]
                assert cached >= prefix - 1 if radix else cached == 0
        finally:
            await backend.stop()


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, f"{name} is not in /metrics"
    return float(match.group(1))


async def test_an_invalid_call_fails_the_turn_and_is_counted(fake_server, fake):
    addr = fake_server[0]
    params = {"messages": ASK, "tools": [WEATHER], "tool_choice": "required"}
    async with connect(addr) as c, httpx.AsyncClient(base_url=f"http://{addr}") as http:
        before = METRICS.registry.get_sample_value(INVALID_CALLS)
        scraped = _metric((await http.get("/metrics")).text, INVALID_CALLS)
        # A valid call goes through and is not counted ...
        fake.replies.append(fake.call_text("get_weather", {"city": "Paris"}))
        ok, notes = await c.call("generate", params)
        assert ok["result"]["tool_calls"][0]["arguments"] == {"city": "Paris"}
        assert METRICS.registry.get_sample_value(INVALID_CALLS) == before
        # ... one whose arguments break the tool's schema fails the turn, is never sent, and is counted once.
        fake.replies.append(fake.call_text("get_weather", {"city": 5}))
        bad, notes = await c.call("generate", params)
        assert bad["error"]["code"] == -32603 and bad["error"]["data"]["reason"] == "invalid_model_output"
        assert "function_call_request" not in [n["method"] for n in notes]
        assert notes[-1]["method"] == "stream_end" and notes[-1]["params"]["finish_reason"] == "error"
        assert METRICS.registry.get_sample_value(INVALID_CALLS) == before + 1
        assert _metric((await http.get("/metrics")).text, INVALID_CALLS) == scraped + 1


async def test_multibyte_text_streams_exactly_once(fake_server, fake):
    text = "héllo wörld ünïcødé 日本"
    tok = fake.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    # One token per byte: the backend's cumulative text ends in U+FFFD inside each character.
    partial = [tok.decode(ids[:i]) for i in range(1, len(ids))]
    assert sum(p.endswith("\ufffd") for p in partial) >= 8
    fake.replies.append(text)
    async with connect(fake_server[0]) as c:
        r, notes = await c.call("generate", {"messages": ASK, "tool_choice": "none"})
    chunks = [n["params"]["text"] for n in notes if n["method"] == "text_chunk"]
    assert not [ch for ch in chunks if "\ufffd" in ch], chunks
    assert "".join(chunks) == text == r["result"]["text"]
    assert r["result"]["finish_reason"] == "stop"
