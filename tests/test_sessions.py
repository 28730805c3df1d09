"""Agent sessions over the real socket with the real engine: valid calls, reused prefixes.

The tool-schema errors are refused before any generation: they run on the fake backend.
"""

from __future__ import annotations

import jsonschema
import pytest

from conftest import connect

SYSTEM = "You are a travel assistant. Use the tools to answer questions about weather and flights."
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"]}}},
    {"type": "function", "function": {
        "name": "search_flights", "description": "Find flights between two airports.",
        "parameters": {"type": "object", "properties": {
            "origin": {"type": "string", "maxLength": 3, "minLength": 3},
            "destination": {"type": "string", "maxLength": 3, "minLength": 3},
            "passengers": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["origin", "destination", "passengers"]}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def calls_of(notes):
    return [{k: v for k, v in n["params"].items() if k != "request_id"}
            for n in notes if n["method"] == "function_call_request"]


def assert_valid(calls):
    for call in calls:
        jsonschema.validate(call["arguments"], SCHEMAS[call["name"]])


@pytest.mark.engine
async def test_five_turn_tool_session_reuses_everything(server):
    async with connect(server[0]) as c:
        opened, _ = await c.call("session.open", {"system_prompt": SYSTEM, "tools": TOOLS})
        sid, prefix = opened["result"]["session_id"], opened["result"]["prefix_tokens"]
        assert prefix > 100
        turns = []
        message = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
        call_ids: set[str] = set()
        for t in range(5):
            choice = "required" if t < 4 else "none"
            r, notes = await c.call("generate", {"session_id": sid, "messages": message, "tool_choice": choice,
                                                 "max_tokens": 64})
            result = r["result"]
            turns.append(result["usage"])
            calls = calls_of(notes)
            assert calls == result["tool_calls"]
            assert_valid(calls)
            if choice == "required":
                assert result["finish_reason"] == "tool_calls" and len(calls) >= 1
                assert not ({c["call_id"] for c in calls} & call_ids), "call ids repeat within the session"
                call_ids |= {c["call_id"] for c in calls}
                message = [{"role": "tool", "tool_call_id": call["call_id"], "content": '{"result": "ok", "value": 18}'}
                           for call in calls]
            else:
                assert calls == [] and result["finish_reason"] in ("stop", "length")
        # Every turn after the first: the whole previous prompt and output came from the cache.
        for prev, cur in zip(turns, turns[1:], strict=False):
            reusable = prev["prompt_tokens"] + prev["completion_tokens"]
            assert cur["cached_tokens"] >= 0.99 * reusable, (prev, cur)
            assert cur["prompt_tokens"] > reusable  # nothing re-rendered: the prompt only grew
        print("per-turn usage:", turns)
        # A second session of the same agent definition starts from the cached prefix.
        other, _ = await c.call("session.open", {"system_prompt": SYSTEM, "tools": list(reversed(TOOLS))})
        assert other["result"]["prefix_tokens"] == prefix  # canonical: tool order and key order do not matter
        r, _ = await c.call("generate", {"session_id": other["result"]["session_id"], "tool_choice": "required",
                                         "messages": [{"role": "user", "content": "Flights from CDG to JFK for 2?"}],
                                         "max_tokens": 64})
        assert r["result"]["usage"]["cached_tokens"] >= 0.99 * prefix
        assert_valid(r["result"]["tool_calls"])
        closed, _ = await c.call("session.close", {"session_id": sid})
        assert closed["result"] == {"closed": True}
        gone, notes = await c.call("generate", {"session_id": sid, "messages": message})
        assert gone["error"]["code"] == -32001


@pytest.mark.engine
async def test_tool_choice_modes_stateless(server):
    ask = [{"role": "user", "content": "I need the weather in Rome and flights from FCO to LHR for 1."}]
    async with connect(server[0]) as c:
        named = {"type": "function", "function": {"name": "search_flights"}}
        r, notes = await c.call("generate", {"messages": ask, "tools": TOOLS, "system_prompt": SYSTEM,
                                             "tool_choice": named, "max_tokens": 64})
        calls = r["result"]["tool_calls"]
        assert len(calls) == 1 and calls[0]["name"] == "search_flights"
        assert_valid(calls)
        r, notes = await c.call("generate", {"messages": ask, "tools": TOOLS, "system_prompt": SYSTEM,
                                             "tool_choice": "none", "max_tokens": 32})
        assert r["result"]["tool_calls"] == [] and calls_of(notes) == []
        r, notes = await c.call("generate", {"messages": ask, "tools": TOOLS, "system_prompt": SYSTEM,
                                             "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 64})
        assert len(r["result"]["tool_calls"]) == 1
        assert_valid(r["result"]["tool_calls"])
        # Continue statelessly: the whole history, the tool result answering the call.
        call = r["result"]["tool_calls"][0]
        history = ask + [{"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": call["call_id"], "content": "done"}]
        r2, _ = await c.call("generate", {"messages": history, "tools": TOOLS, "system_prompt": SYSTEM,
                                          "tool_choice": "none", "max_tokens": 16})
        assert r2["result"]["finish_reason"] in ("stop", "length")
        assert r2["result"]["usage"]["cached_tokens"] > 0


async def test_tool_schema_errors(fake_server):
    async with connect(fake_server[0]) as c:
        bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": 5}}}}}]
        r, _ = await c.call("session.open", {"tools": bad})
        assert r["error"]["code"] == -32602
        unenforceable = [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}}}}]
        r, _ = await c.call("session.open", {"tools": unenforceable})
        assert r["error"]["code"] == -32003
        assert r["error"]["data"] == {"tool": "f", "keyword": "uniqueItems"}
        r, _ = await c.call("generate", {"messages": [{"role": "user", "content": "hi"}], "tools": unenforceable})
        assert r["error"]["code"] == -32003
