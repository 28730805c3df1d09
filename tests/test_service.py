"""runtime.service and runtime.turn on the fake backend, without a socket: the turn's contract
and the error mapping at the seam."""

from __future__ import annotations

import asyncio

import pytest

import programs
from conftest import test_config
from protocol import errors as rpc
from protocol.models import GenerateRequestParams
from runtime.backends import GenRequest, GenUpdate, Sampling
from runtime.service import AgentRuntime
from runtime.turn import _TextFeed, run_token_turn

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def _params(**kw):
    return GenerateRequestParams.model_validate(kw)


async def _generate(rt: AgentRuntime, params, events=None):
    async def emit(kind, payload):
        if events is not None:
            events.append((kind, payload))

    return await rt.generate(params, owner="", emit=emit, cancelled=asyncio.Event())


def test_text_feed_gives_each_character_once_and_holds_back_a_revisable_tail() -> None:
    feed = _TextFeed()
    assert feed.new("ab\ufffd") == "ab"  # an incomplete UTF-8 sequence is not final yet
    assert feed.new("abé") == "é"
    assert feed.new("abéc") == "c"
    # a revision below what was already parsed: nothing is given twice, what follows goes on
    assert feed.new("abXcd") == "d"
    assert feed.new("abXcd\ufffd", final=True) == "\ufffd"


async def test_a_session_turn_appends_prompt_and_output_ids(fake) -> None:
    rt = AgentRuntime(test_config(), fake)
    opened = await rt.open_session(system_prompt="sys", tools=TOOLS, owner="")
    fake.replies.append(fake.call_text("get_weather", {"city": "Paris"}))
    events: list = []
    out = await _generate(rt, _params(session_id=opened.session_id, tool_choice="required",
                                      messages=[{"role": "user", "content": "weather?"}]), events)
    assert out.finish_reason == "tool_calls" and out.error is None
    assert [k for k, _ in events] == ["function_call_request"]
    session = rt.sessions.get(opened.session_id, owner="")
    assert session.token_ids == out.prompt_ids + out.output_ids
    assert session.pending_calls == {out.tool_calls[0]["call_id"]: "get_weather"}
    # the next turn's prompt extends this one: the fake's prefix record serves all of it
    out2 = await _generate(rt, _params(session_id=opened.session_id, messages=[
        {"role": "tool", "tool_call_id": out.tool_calls[0]["call_id"], "content": "sunny"}]))
    assert out2.error is None and out2.prompt_ids[: len(session.token_ids) - len(out2.output_ids)]
    assert out2.cached_tokens == len(out.prompt_ids) + len(out.output_ids)


async def test_a_render_error_is_the_clients_and_any_other_error_is_not(fake, monkeypatch) -> None:
    rt = AgentRuntime(test_config(), fake)
    params = _params(messages=[{"role": "user", "content": "hi"}])

    def refuse(*_a, **_k):
        raise programs.RenderError("the history must end with a user or tool message")

    monkeypatch.setattr(rt.renderer, "full_ids", refuse)
    with pytest.raises(rpc.InvalidParams):
        await _generate(rt, params)

    def bug(*_a, **_k):
        raise ValueError("a bug in the renderer")

    monkeypatch.setattr(rt.renderer, "full_ids", bug)
    with pytest.raises(ValueError, match="a bug"):  # the front end answers it as -32603, not -32602
        await _generate(rt, params)


class _Scripted:
    """A token backend that streams given updates (for the turn's own contract)."""

    def __init__(self, updates):
        self.updates = updates
        self.aborted: list[str] = []

    async def stream(self, request):
        for u in self.updates:
            yield u

    async def abort(self, rid):
        self.aborted.append(rid)


async def test_the_turn_feeds_the_parser_only_new_text_when_the_backend_revises(fake) -> None:
    prog = programs.ToolProgram(programs.format_for(fake.tokenizer), None, tool_choice="none")
    ups = [GenUpdate(text=t, output_ids=list(range(i + 1)), prompt_tokens=3, cached_tokens=0, completion_tokens=i + 1)
           for i, t in enumerate(["he", "hel\ufffd", "hello", "hello!"])]
    ups[-1].finish_reason = "stop"
    chunks: list[str] = []

    async def emit(kind, payload):
        chunks.append(payload["text"])

    out = await run_token_turn(_Scripted(ups), GenRequest(rid="r", input_ids=[1, 2, 3], sampling=Sampling(max_new_tokens=8)),
                               prog, emit=emit, cancelled=asyncio.Event())
    assert out.text == "hello!" and "".join(chunks) == "hello!" and out.finish_reason == "stop"
    assert out.output_ids == [0, 1, 2, 3] and out.prompt_ids == [1, 2, 3]


async def test_kept_output_ids_are_exactly_what_the_client_got(fake) -> None:
    rt = AgentRuntime(test_config(), fake)
    opened = await rt.open_session(system_prompt="sys", tools=TOOLS, owner="")
    tok = fake.tokenizer
    call = fake.call_text("get_weather", {"city": "Paris"})
    for reply, reason, text in ((call, "tool_calls", ""), ("Hello " + call + "\n", "tool_calls", "Hello "),
                                ("a < b <tool no call", "stop", "a < b <tool no call")):
        fake.replies.append(reply)
        events: list = []
        out = await _generate(rt, _params(session_id=opened.session_id, messages=[{"role": "user", "content": "x"}]), events)
        # a complete turn keeps all of its output (the end-of-turn token included) ...
        assert out.finish_reason == reason and out.text == text
        assert out.output_ids == tok.encode(reply, add_special_tokens=False) + [tok.eos_token_id]
        # ... and its calls went out last, after the text, once the output was accepted
        kinds = [k for k, _ in events]
        assert kinds == ["text_chunk"] * (len(kinds) - (reason == "tool_calls")) + ["function_call_request"] * (reason == "tool_calls")
    # a call cut off by max_tokens: neither sent nor kept
    fake.replies.append("Sure. " + call)
    out = await _generate(rt, _params(session_id=opened.session_id, max_tokens=12, messages=[{"role": "user", "content": "x"}]))
    assert out.finish_reason == "length" and out.text == "Sure. " and out.tool_calls == []
    assert tok.decode(out.output_ids) == "Sure. " and out.completion_tokens == 12
    session = rt.sessions.get(opened.session_id, owner="")
    assert session.token_ids == out.prompt_ids + out.output_ids and session.open_turn


def test_empty_parameters_mean_no_parameters_as_at_openai() -> None:
    from runtime.prompts import check_tools

    empty = check_tools([{"type": "function", "function": {"name": "now", "parameters": {}, "strict": True}}])
    assert empty == check_tools([{"type": "function", "function": {"name": "now"}}])
    assert empty[0]["function"]["parameters"] == {"type": "object", "properties": {}}
