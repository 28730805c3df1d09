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


# ---------------------------------------------------------------- in the middle of the output
# runtime.sglang_adapter.jump_forward: after a decode step, the span a request's grammar forces
# is appended to its output and computed by one extend pass (the scheduler's side).

class _Grammar:
    """A grammar object as the scheduler holds it: forces `forced`, refuses the token `refuse`."""

    def __init__(self, forced: str, refuse: int | None = None):
        self.forced, self.refuse, self.accepted, self.rolled_back = forced, refuse, [], 0

    def try_jump_forward(self, tokenizer):
        return ([], self.forced) if self.forced else None

    def jump_forward_str_state(self, helper):
        return helper[1], -1

    def accept_token(self, token: int):
        if token == self.refuse:
            raise ValueError("Tokens not accepted")
        self.accepted.append(token)

    def rollback(self, k: int):
        self.rolled_back += k
        del self.accepted[-k:]


class _CharTokenizer:
    @staticmethod
    def encode(text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]


def _req(grammar, *, output=5, max_new=96, **flags):
    from types import SimpleNamespace

    req = SimpleNamespace(grammar=grammar, is_retracted=False, beam_group=None, return_logprob=False,
                          return_hidden_states=False, return_sampling_mask=False, output_ids=list(range(output)),
                          sampling_params=SimpleNamespace(stop_strs=[], max_new_tokens=max_new), done=False)
    req.finished = lambda: req.done
    for k, v in flags.items():
        setattr(req, k, v)
    return req


def test_a_forced_span_leaves_its_last_token_to_the_model_and_is_checked_by_the_grammar():
    from types import SimpleNamespace

    from runtime.sglang_adapter import jump_forward as jf

    sched = SimpleNamespace(tokenizer=_CharTokenizer())
    assert jf._span(sched, _req(_Grammar('","zone":"'))) == [ord(c) for c in '","zone":']
    assert jf._span(sched, _req(_Grammar(""))) == []
    assert jf._span(sched, _req(_Grammar('","zone":"'), output=88)) == []  # too near max_new_tokens
    g = _Grammar('","zone":"')
    assert jf._accepted(g, jf._span(sched, _req(g))) and g.accepted == [ord(c) for c in '","zone":']
    # a token the grammar refuses: the tokens it took are rolled back, nothing is forced
    g = _Grammar('","zone":"', refuse=ord("z"))
    assert not jf._accepted(g, jf._span(sched, _req(g))) and g.accepted == [] and g.rolled_back == 3


def test_spans_jump_when_worth_their_pass_for_the_batch(monkeypatch):
    from runtime.sglang_adapter import jump_forward as jf

    assert [jf.min_span(b) for b in range(1, 9)] == [2, 3, 3, 4, 4, 5, 5, 6]
    assert jf.min_span(8, prefill_pending=True) == 1
    # a batch of 8 whose spans are all short: nothing moves
    batch, sched, _ = _batch_of(monkeypatch, ['"}'] * 8)
    jf._jump(sched, batch)
    assert len(batch.reqs) == 8
    # one span long enough for the batch: it jumps, and the short ones ride in its pass
    batch, sched, queued = _batch_of(monkeypatch, ['"}"', '"}', '","destination":"', ""])
    jf._jump(sched, batch)
    assert sorted(queued) == [0, 1, 2] and [r.name for r in batch.reqs] == [3]
    # requests already waiting: a prefill runs next anyway, so every span rides in it
    batch, sched, queued = _batch_of(monkeypatch, ['"}"'] * 8, waiting=True)
    jf._jump(sched, batch)
    assert sorted(queued) == list(range(8)) and batch.reqs == []


@pytest.mark.parametrize("sharing", [True, False])
def test_no_jump_without_a_radix_cache(monkeypatch, sharing):
    """Without prefix sharing (INFERENCE_RADIX_CACHE=false) a queued request would compute its
    whole context again: the hook leaves every span to the decode steps."""
    from types import SimpleNamespace

    from runtime.sglang_adapter import jump_forward as jf

    batch, sched, queued = _batch_of(monkeypatch, ['","destination":"'])
    batch.forward_mode = SimpleNamespace(is_decode=lambda: True)
    batch.spec_algorithm = SimpleNamespace(is_none=lambda: True)
    sched.running_batch, sched.enable_overlap = batch, False
    sched.tree_cache = SimpleNamespace(supports_prefix_sharing=lambda: sharing)
    assert jf.after_result("result", sched, batch) == "result"
    assert queued == ([0] if sharing else [])


def _batch_of(monkeypatch, forced: list[str], waiting: bool = False):
    """A running batch of requests whose grammars force these texts, the scheduler around it, and
    the requests it queues again (by index)."""
    from types import SimpleNamespace

    import sglang.srt.mem_cache.common as common

    monkeypatch.setattr(common, "release_kv_cache", lambda *a, **k: None)
    reqs = []
    for i, text in enumerate(forced):
        r = _req(_Grammar(text))
        r.name, r.reset_for_retract = i, lambda: None
        reqs.append(r)
    queued: list[int] = []

    class Batch:
        batch_is_full = True

        def filter_batch(self, reqs_to_exclude):
            self.reqs = [r for r in self.reqs if r not in reqs_to_exclude]

    batch = Batch()
    batch.reqs = reqs
    sched = SimpleNamespace(tokenizer=_CharTokenizer(), tree_cache=object(), waiting_queue=["x"] if waiting else [],
                            _add_request_to_queue=lambda req, is_retracted: queued.append(req.name))
    return batch, sched, queued


@pytest.mark.parametrize("flag", ["return_logprob", "return_hidden_states", "finished", "aborting", "stop", "no-grammar"])
def test_requests_whose_output_a_jump_would_change_decode_their_span(flag):
    from runtime.sglang_adapter import jump_forward as jf

    req = _req(_Grammar('","zone":"'))
    if flag == "finished":
        req.done = True
    elif flag == "aborting":
        req.to_finish = "abort"
    elif flag == "stop":
        req.sampling_params.stop_strs = ["</tool_call>"]
    elif flag == "no-grammar":
        req.grammar = None
    else:
        setattr(req, flag, True)
    assert not jf._eligible(req)
    assert jf._eligible(_req(_Grammar('","zone":"')))


def test_a_jumping_request_is_checkpointed_appended_and_queued_again(monkeypatch):
    from types import SimpleNamespace

    import sglang.srt.mem_cache.common as common

    from runtime.sglang_adapter import jump_forward as jf

    events = []
    monkeypatch.setattr(common, "release_kv_cache", lambda req, tree, *, checkpoint: events.append(("release", req.name, checkpoint)))
    stay, jump = _req(_Grammar("")), _req(_Grammar('","zone":"'))
    stay.name, jump.name = "stay", "jump"
    jump.reset_for_retract = lambda: events.append(("reset", jump.name, list(jump.output_ids)))

    class Batch:
        reqs = [stay, jump]
        batch_is_full = True

        def filter_batch(self, reqs_to_exclude):
            self.reqs = [r for r in self.reqs if r not in reqs_to_exclude]

    sched = SimpleNamespace(tokenizer=_CharTokenizer(), tree_cache=object(), waiting_queue=[],
                            _add_request_to_queue=lambda req, is_retracted: events.append(("queued", req.name, is_retracted)))
    batch = Batch()
    before = dict(jf.STATS)
    jf._jump(sched, batch)
    assert batch.reqs == [stay] and not batch.batch_is_full
    # the KV goes into the radix tree before the request leaves; the span is appended after
    assert events == [("release", "jump", True), ("reset", "jump", [0, 1, 2, 3, 4]), ("queued", "jump", True)]
    assert jump.output_ids == [0, 1, 2, 3, 4, *map(ord, '","zone":')]
    assert jf.STATS["spans"] == before["spans"] + 1 and jf.STATS["tokens"] == before["tokens"] + 9


FLIGHT = {"type": "function", "function": {"name": "book_flight", "description": "Book a flight.", "parameters": {
    "type": "object", "properties": {"departure_city": {"type": "string"},
                                     "destination_city_for_the_outbound_flight": {"type": "string"}},
    "required": ["departure_city", "destination_city_for_the_outbound_flight"]}}}


@pytest.mark.engine
async def test_engine_jumps_over_a_required_key_in_the_middle_of_a_call(backend):
    """The second required key is forced once the first value closes: the scheduler appends it
    (one extend pass), the model writes the value, the call validates and the engine stays sound."""
    if backend.info.device != "cpu":
        pytest.skip("jump-forward in the middle of calls runs in the CPU engine's scheduler")
    from runtime.sglang_adapter import jump_forward as jf

    before = await backend.jump_forward_counts()
    rt = AgentRuntime(test_config(), backend)
    params = _params(messages=[{"role": "user", "content": "Book me a flight from Paris to Tokyo."}],
                     tools=[FLIGHT], tool_choice={"type": "function", "function": {"name": "book_flight"}},
                     max_tokens=64)
    out = await _turn(rt, params)
    after = await backend.jump_forward_counts()
    assert out.error is None and out.finish_reason == "tool_calls", out
    args = out.tool_calls[0]["arguments"]
    assert set(args) == {"departure_city", "destination_city_for_the_outbound_flight"}
    assert all(isinstance(v, str) for v in args.values())
    assert after["spans"] >= before["spans"] + 1 and after["tokens"] >= before["tokens"] + jf.min_span(1)
    assert after["errors"] == before["errors"]
    text = backend.tokenizer.decode(out.output_ids)
    assert "destination_city_for_the_outbound_flight" in text and out.completion_tokens == len(out.output_ids)
    # The request's KV went back whole: SGLang's scheduler checks its pools for leaks whenever it
    # idles (a leak stops it), and the same turn runs again.
    await asyncio.sleep(0.5)
    again = await _turn(rt, params)
    assert again.error is None and again.tool_calls[0]["arguments"].keys() == args.keys()
    assert backend.check_alive()
