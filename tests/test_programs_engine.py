"""The tool-call program against the real engine and the default model (greedy decoding).

What a user of the default model sees: forced calls come out valid against their schema, in
compact JSON, and the turn ends right after the call (finish 'stop' on the end-of-turn token,
no text after it); `none` never calls; a session's next turn appends to the cached prompt.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

import programs as P
from runtime.backends import GenRequest, Sampling
from runtime.turn import run_token_turn

pytestmark = pytest.mark.engine

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather for a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"]}}},
    {"type": "function", "function": {
        "name": "search", "description": "Search the web.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string"},
            "filters": {"type": "object", "properties": {
                "site": {"type": "string"},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
                "required": ["tags"]},
            "limit": {"type": "integer", "minimum": 1, "maximum": 10}},
            "required": ["query", "filters"]}}},
    {"type": "function", "function": {
        "name": "send_email", "description": "Send an email.",
        "parameters": {"type": "object", "properties": {
            "to": {"type": "string", "format": "email"},
            "subject": {"type": "string", "maxLength": 60},
            "body": {"type": "string", "maxLength": 200}},
            "required": ["to", "subject", "body"]}}},
]
SYSTEM = "You are a helpful assistant that uses tools."
USER = [{"role": "user", "content": "What is the weather in Paris in celsius?"}]
MAX_NEW = 64


@pytest.fixture(scope="module")
def setup(backend):
    tok = backend.tokenizer
    fmt = P.format_for(tok, getattr(backend, "model_path", None))
    tools = P.check_tools(TOOLS)
    renderer = P.Renderer(tok, fmt)
    return fmt, tools, renderer


class _Recording:
    """The engine, with the last update it streamed kept: the raw output the assertions read."""

    def __init__(self, backend):
        self.backend = backend
        self.last = None

    async def stream(self, request):
        async for u in self.backend.stream(request):
            self.last = u
            yield u

    async def abort(self, rid):
        await self.backend.abort(rid)


async def _turn(backend, renderer, program, ids):
    """One turn through the runtime's own token turn (runtime.turn), as the server runs it."""
    engine = _Recording(backend)
    sampling = Sampling(max_new_tokens=MAX_NEW, temperature=0.0, constraint=program.constraint())

    async def emit(kind, payload):
        return None

    out = await run_token_turn(engine, GenRequest(rid=uuid.uuid4().hex, input_ids=ids, sampling=sampling), program,
                               emit=emit, cancelled=asyncio.Event())
    last = engine.last
    calls = [P.ToolCallEvent(name=c["name"], arguments=c["arguments"], index=i) for i, c in enumerate(out.tool_calls)]
    bad = [] if out.error is None else [out.error.message]
    print(f"\n[{program.mode}/{program.named}] finish={last.finish_reason} raw={last.text!r} calls={calls} bad={bad}")
    return last, calls, out.text, bad


def _assert_clean_call_turn(renderer, fmt, last, calls, text, bad):
    assert bad == []
    assert last.finish_reason == "stop"
    assert last.output_ids[-1] in renderer.stop_token_ids  # the end-of-turn token ends the output
    assert text.strip() == ""  # nothing but the call(s)
    raw = last.text.replace(renderer.end_of_turn, "")
    # exactly the calls in canonical compact syntax: no whitespace padding, nothing after them
    assert raw == fmt.call_separator.join(fmt.call_text(c.name, c.arguments) for c in calls)


async def test_required_gives_a_valid_call_and_ends_the_turn(backend, setup):
    fmt, tools, renderer = setup
    program = P.ToolProgram(fmt, tools, tool_choice="required", end_of_turn=renderer.end_of_turn)
    last, calls, text, bad = await _turn(backend, renderer, program, renderer.full_ids(SYSTEM, tools, USER))
    assert len(calls) >= 1
    for call in calls:
        tool = next(t for t in tools if t["function"]["name"] == call.name)
        assert P.validate_arguments(tool, call.arguments) == []
    _assert_clean_call_turn(renderer, fmt, last, calls, text, bad)
    args = last.text.split('"arguments":', 1)[1]
    assert json.dumps(calls[0].arguments, separators=(",", ":"), ensure_ascii=False) in args  # compact


async def test_named_choice_calls_that_tool(backend, setup):
    fmt, tools, renderer = setup
    program = P.ToolProgram(fmt, tools, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                            end_of_turn=renderer.end_of_turn)
    last, calls, text, bad = await _turn(backend, renderer, program, renderer.full_ids(SYSTEM, tools, USER))
    assert [c.name for c in calls] == ["get_weather"]
    assert calls[0].arguments["unit"] in ("celsius", "fahrenheit")
    _assert_clean_call_turn(renderer, fmt, last, calls, text, bad)


async def test_single_call_when_not_parallel(backend, setup):
    fmt, tools, renderer = setup
    user = [{"role": "user", "content": "What is the weather in Rome and in Paris, in celsius?"}]
    program = P.ToolProgram(fmt, tools, tool_choice="required", parallel_tool_calls=False,
                            end_of_turn=renderer.end_of_turn)
    last, calls, text, bad = await _turn(backend, renderer, program, renderer.full_ids(SYSTEM, tools, user))
    assert len(calls) == 1
    _assert_clean_call_turn(renderer, fmt, last, calls, text, bad)


async def test_none_never_calls(backend, setup):
    fmt, tools, renderer = setup
    program = P.ToolProgram(fmt, tools, tool_choice="none", end_of_turn=renderer.end_of_turn)
    last, calls, text, bad = await _turn(backend, renderer, program, renderer.full_ids(SYSTEM, tools, USER))
    assert calls == [] and bad == []
    assert text.strip() and "<tool_call>" not in last.text


async def test_auto_is_text_or_valid_calls(backend, setup):
    fmt, tools, renderer = setup
    program = P.ToolProgram(fmt, tools, tool_choice="auto", end_of_turn=renderer.end_of_turn)
    last, calls, text, bad = await _turn(backend, renderer, program, renderer.full_ids(SYSTEM, tools, USER))
    assert bad == []
    assert calls or text.strip()
    if calls and last.finish_reason == "stop":
        assert last.text.rstrip().endswith("</tool_call>" + renderer.end_of_turn)


async def test_session_turn_appends_to_the_cached_prompt(backend, setup):
    """Turn 2 = turn 1's prompt + its output ids + turn_ids(tool result): the engine serves all of
    turn 1 from its prefix cache, and the stateless rendering of the same history differs at
    most where the model's tokens differ from the canonical tokenization of its text."""
    fmt, tools, renderer = setup
    ids = renderer.full_ids(SYSTEM, tools, USER)
    program = P.ToolProgram(fmt, tools, tool_choice="required", end_of_turn=renderer.end_of_turn)
    last, calls, _, bad = await _turn(backend, renderer, program, ids)
    assert calls and bad == []
    closed = last.output_ids[-1] in renderer.stop_token_ids
    session = ids + list(last.output_ids)
    result = [{"role": "tool", "tool_call_id": "call_1", "name": calls[0].name, "content": '{"temperature": 18}'}]
    ids2 = session + renderer.turn_ids(result, close_previous=not closed)
    program2 = P.ToolProgram(fmt, tools, tool_choice="none", end_of_turn=renderer.end_of_turn)
    last2, calls2, text2, bad2 = await _turn(backend, renderer, program2, ids2)
    assert calls2 == [] and bad2 == []
    assert last2.cached_tokens >= len(session) - 1
    history = USER + [{"role": "assistant", "content": None, "tool_calls": [
        {"call_id": "call_1", "name": calls[0].name, "arguments": calls[0].arguments}]}] + result
    stateless = renderer.full_ids(SYSTEM, tools, history)
    # same text, whatever the tokenization the model chose inside the call
    assert renderer.tokenizer.decode(stateless) == renderer.tokenizer.decode(ids2)
