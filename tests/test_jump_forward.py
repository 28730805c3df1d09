"""Jump-forward: the opening the tool-call grammar forces at the start of a turn is appended to
the prompt instead of decoded (programs.ToolProgram.forced, runtime.turn.jump_forward)."""

from __future__ import annotations

import asyncio
import json

import pytest
from xgrammar import Grammar
from xgrammar.testing import _is_grammar_accept_string as accepts

from conftest import test_config
from programs import FORMATS, ToolProgram
from protocol.models import GenerateRequestParams
from runtime.metrics import METRICS
from runtime.service import AgentRuntime

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Time in a zone.", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
NAMED = {"type": "function", "function": {"name": "get_time"}}


def _program(fmt: str, choice, *, jump: bool = True, tools=(WEATHER, TIME), parallel: bool = True) -> ToolProgram:
    return ToolProgram(FORMATS[fmt], list(tools), tool_choice=choice, parallel_tool_calls=parallel, jump_forward=jump)


@pytest.mark.parametrize("fmt", ["default", "qwen25", "hermes", "deepseekv3"])
def test_forced_opening_by_tool_choice(fmt):
    f = FORMATS[fmt]
    assert _program(fmt, NAMED).forced == f.begin("get_time")  # everything up to the arguments
    assert _program(fmt, "required", tools=[WEATHER], parallel=False).forced == f.begin("get_weather")
    both = _program(fmt, "required", parallel=False).forced
    assert both and f.begin("get_time").startswith(both) and f.begin("get_weather").startswith(both)
    assert "get_" not in both or f.begin("get_time")[: len(both)] == f.begin("get_weather")[: len(both)]
    for choice in ("auto", "none"):  # text may come first: nothing is forced
        assert _program(fmt, choice).forced == ""
    assert _program(fmt, NAMED, jump=False).forced == ""
    if f.parallel and (f.max_calls or 2) > 1:  # several calls possible: the turn's shape is not fixed
        assert _program(fmt, "required").forced == ""


def test_reasoning_formats_force_nothing():
    for fmt in ("qwen3-thinking", "deepseek-r1"):
        assert _program(fmt, NAMED).forced == ""


@pytest.mark.parametrize("fmt", ["default", "qwen25"])
@pytest.mark.parametrize("choice", [NAMED, "required"])
def test_the_constraint_starts_after_the_forced_opening(fmt, choice):
    """Forced text + what the jump-forward grammar accepts == what the full grammar accepts."""
    full, jump = _program(fmt, choice, jump=False, parallel=False), _program(fmt, choice, parallel=False)
    f = FORMATS[fmt]
    g_full = Grammar.from_structural_tag(full.constraint().value)
    g_jump = Grammar.from_structural_tag(jump.constraint().value)
    calls = [f.call_text("get_time", {"zone": "UTC"})]
    if choice == "required":
        calls.append(f.call_text("get_weather", {"city": "Paris"}))
    for text in calls:
        assert text.startswith(jump.forced)
        assert accepts(g_full, text) and accepts(g_jump, text[len(jump.forced):])
        assert not accepts(g_jump, text)  # the opening is not generated again
    assert not accepts(g_jump, f.call_text("get_time", {"zone": 3})[len(jump.forced):])  # arguments still held


def _params(**kw):
    return GenerateRequestParams.model_validate(kw)


async def _turn(rt: AgentRuntime, params):
    async def emit(kind, payload):
        return None

    return await rt.generate(params, owner="", emit=emit, cancelled=asyncio.Event())


@pytest.mark.parametrize("jump", [True, False])
async def test_a_named_call_is_appended_not_decoded(fake, jump):
    rt = AgentRuntime(test_config(INFERENCE_JUMP_FORWARD=str(jump).lower()), fake)
    opened = await rt.open_session(system_prompt="sys", tools=[WEATHER, TIME], owner="")
    reply = fake.call_text("get_time", {"zone": "UTC"})
    fake.replies.append(reply)
    before = METRICS.forced_tokens._value.get()
    out = await _turn(rt, _params(session_id=opened.session_id, tool_choice=NAMED, max_tokens=200,
                                  messages=[{"role": "user", "content": "time?"}]))
    assert out.error is None and out.finish_reason == "tool_calls"
    assert out.tool_calls[0]["name"] == "get_time" and out.tool_calls[0]["arguments"] == {"zone": "UTC"}
    request = fake.requests[-1]
    tok = fake.tokenizer
    forced = tok.encode(FORMATS["default"].begin("get_time"), add_special_tokens=False) if jump else []
    # The engine got the prompt + the forced opening, and decoded only the rest of the call.
    assert request.input_ids == out.prompt_ids + forced
    assert request.sampling.max_new_tokens == 200 - len(forced)
    assert out.forced_tokens == len(forced) and METRICS.forced_tokens._value.get() == before + len(forced)
    # The output is the whole call, as if decoded: the session appends exactly that.
    assert tok.decode(out.output_ids) == reply + tok.eos_token
    assert out.completion_tokens == len(out.output_ids) and out.prompt_tokens == len(out.prompt_ids)
    assert rt.sessions.get(opened.session_id, owner="").token_ids == out.prompt_ids + out.output_ids


@pytest.mark.parametrize("max_tokens", [3, 30])
async def test_max_tokens_inside_the_forced_opening_decodes_it_and_keeps_nothing(fake, max_tokens):
    """An opening longer than max_tokens (the fake tokenizer has a token per byte: it is ~45) is
    not forced: the turn decodes from the unforced constraint and ends with 'length' at max_tokens."""
    rt = AgentRuntime(test_config(), fake)
    opened = await rt.open_session(system_prompt="sys", tools=[WEATHER, TIME], owner="")
    session = rt.sessions.get(opened.session_id, owner="")
    prefix = list(session.token_ids)
    fake.replies.append(fake.call_text("get_time", {"zone": "UTC"}))
    out = await _turn(rt, _params(session_id=opened.session_id, tool_choice=NAMED, max_tokens=max_tokens,
                                  messages=[{"role": "user", "content": "time?"}]))
    assert out.finish_reason == "length" and out.tool_calls == [] and out.text == ""
    request = fake.requests[-1]
    assert request.input_ids == out.prompt_ids and request.sampling.max_new_tokens == max_tokens
    assert request.sampling.constraint == ToolProgram(FORMATS["default"], [WEATHER, TIME], tool_choice=NAMED).constraint()
    assert out.completion_tokens == max_tokens and out.forced_tokens == 0
    # Nothing of the call reached the client, so the session keeps none of it.
    assert session.token_ids == out.prompt_ids and session.token_ids[: len(prefix)] == prefix


@pytest.mark.engine
async def test_engine_named_call_with_jump_forward(backend):
    """The default model under a named tool_choice: the forced opening is appended, the model
    writes the arguments, and the call validates."""
    rt = AgentRuntime(test_config(), backend)
    # A prompt the model answers with a valid call in float32 and in bf16 with either attention
    # path. (Its first prompt, "What time is it in Tokyo?", ran the zone's string to the length
    # limit in float32, "US_Central_Taiwan_Japan_Japan...", and with the compiled attention; only
    # SDPA's bf16 rounding made it stop: docs/BENCHMARKS.md, "fifth round".)
    params = _params(messages=[{"role": "user", "content": "Tell me the current time in London. (jump-forward test)"}],
                     tools=[WEATHER, TIME], tool_choice=NAMED, max_tokens=48)
    out = await _turn(rt, params)
    assert out.error is None and out.finish_reason == "tool_calls", out
    assert out.tool_calls[0]["name"] == "get_time" and isinstance(out.tool_calls[0]["arguments"]["zone"], str)
    opening = backend.tokenizer.encode(FORMATS["default"].begin("get_time"), add_special_tokens=False)
    assert out.forced_tokens == len(opening) > 5 and out.output_ids[: len(opening)] == opening
    assert json.loads(json.dumps(out.tool_calls[0]["arguments"])) == out.tool_calls[0]["arguments"]
