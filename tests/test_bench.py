"""`python -m bench`: the workload is deterministic, the theoretical maximum is right, and the
whole benchmark runs end to end on a tiny preset with the real engine (structure and sanity
of its outputs; no speed assertions)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bench.metrics import TurnRecord, fill_theoretical
from bench.runner import ALL_MODES, BenchError, parse_modes
from bench.workload import PRESETS, WorkloadSpec, build_workload


def _fake_workload(spec: WorkloadSpec):
    # Sizes by a crude token count: determinism does not depend on the tokenizer.
    count = lambda s: len(s) // 4  # noqa: E731
    return build_workload(spec, count_tokens=count, prefix_len=lambda system, tools: count(system + json.dumps(tools)))


def test_workload_is_deterministic_and_shaped_by_the_spec():
    spec = dataclasses.replace(PRESETS["tiny"], sessions=5, turns=4, agents=2, tools=3, prefix_tokens=1500)
    a, b = _fake_workload(spec), _fake_workload(spec)
    assert a.to_dict() == b.to_dict()
    assert a.tool_result(1, 2, 0, "read_file") == b.tool_result(1, 2, 0, "read_file")
    other = _fake_workload(dataclasses.replace(spec, seed=1))
    assert other.to_dict() != a.to_dict()

    assert len(a.agents) == 2 and len(a.sessions) == 5 and a.total_turns == 20
    assert all(len(agent.tools) == 3 for agent in a.agents)
    assert all(n >= 1500 for n in a.prefix_lengths)
    # sessions of one agent share the prefix but not their first message
    assert [s.agent for s in a.sessions] == [0, 1, 0, 1, 0]
    assert len({s.user_messages[0] for s in a.sessions}) == 5
    for s in a.sessions:
        assert len(s.turns) == 4 and s.turns[0].tool_choice == "required"
        names = {t["function"]["name"] for t in a.agents[s.agent].tools}
        for plan in s.turns:
            if isinstance(plan.tool_choice, dict):
                assert plan.tool_choice["function"]["name"] in names
    with pytest.raises(ValueError, match="--sessions"):
        WorkloadSpec(sessions=0)


def test_theoretical_counts_the_agent_prefix_and_earlier_turns():
    prefix = [1, 2, 3, 4]
    r1 = TurnRecord(session=0, turn=1, agent=0, input_kind="user", tool_choice="required", t_start=0.0,
                    prompt_ids=prefix + [10, 11], output_ids=[20, 21])
    r2 = TurnRecord(session=0, turn=2, agent=0, input_kind="tool", tool_choice="auto", t_start=1.0,
                    prompt_ids=prefix + [10, 11, 20, 21, 30], output_ids=[40])
    # another session of the same agent, issued after r1: shares the prefix and nothing more
    r3 = TurnRecord(session=1, turn=1, agent=0, input_kind="user", tool_choice="required", t_start=0.5,
                    prompt_ids=prefix + [12, 13], output_ids=[22])
    # a re-rendered prompt that diverges inside the previous output
    r4 = TurnRecord(session=1, turn=2, agent=0, input_kind="tool", tool_choice="auto", t_start=2.0,
                    prompt_ids=prefix + [12, 13, 99, 98], output_ids=[1])
    fill_theoretical([r2, r4, r1, r3], {0: prefix})
    assert (r1.theoretical_cached, r2.theoretical_cached, r3.theoretical_cached, r4.theoretical_cached) == (4, 8, 4, 6)


def test_modes_flag():
    assert parse_modes(None) == list(ALL_MODES)
    assert parse_modes("hf,engine") == ["engine", "hf"]
    assert parse_modes("no-radix,rerender,server,engine,server") == ["rerender", "server", "engine", "no-radix"]
    with pytest.raises(BenchError, match="unknown mode"):
        parse_modes("server,radix")
    with pytest.raises(BenchError, match="hf replays"):
        parse_modes("server,hf")


def test_openai_mode_sends_assistant_messages_back_as_langchain_does():
    from openai.types.chat import ChatCompletionMessage

    from bench.openai_mode import langchain_assistant, server_timing

    calls = ChatCompletionMessage.model_validate({"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "read_file", "arguments": '{"path":"a/b","range":{"start":1,"end":2}}'}},
        {"id": "call_2", "type": "function", "function": {"name": "ping", "arguments": ""}}]})
    assert langchain_assistant(calls) == {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "id": "call_1",
         "function": {"name": "read_file", "arguments": '{"path": "a/b", "range": {"start": 1, "end": 2}}'}},
        {"type": "function", "id": "call_2", "function": {"name": "ping", "arguments": "{}"}}]}
    text = ChatCompletionMessage.model_validate({"role": "assistant", "content": "Done: é"})
    assert langchain_assistant(text) == {"role": "assistant", "content": "Done: é"}
    assert server_timing("ttft;dur=12.5, total;dur=80") == {"ttft": 12.5, "total": 80.0}
    assert server_timing('miss, db;desc="x";dur=3') == {"db": 3.0} and server_timing(None) == {}


def _minimal(schema: dict):
    """The smallest instance of a tools_pool schema (required properties only)."""
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object":
        return {k: _minimal(schema["properties"][k]) for k in schema.get("required", [])}
    return {"string": "x", "integer": schema.get("minimum", 0), "boolean": False, "array": []}[kind]


def _scripted(fake, workload):
    """Replies on the fake backend: a valid call when the turn is constrained (the named tool when
    the constraint names one tool of the agent), else text; session 1's first turn writes a call
    longer than its max_tokens (cut off: the turn ends with 'length' and its session keeps no call)."""
    tools = {t["function"]["name"]: t["function"]["parameters"] for a in workload.agents for t in a.tools}
    opener = workload.sessions[1].user_messages[0]

    def reply(request, prompt):
        c = request.sampling.constraint
        if c is None:
            return "Noted."
        # A named tool's opening is forced (jump-forward): it ends the prompt, not the constraint.
        names = [n for n in tools if n in str(c.value)] or [n for n in tools if f'"{n}"' in prompt[prompt.rfind("<tool_call>"):]]
        if not names:  # a grammar warm-up (bench.modes.warm_grammars): one token, never parsed
            return "{"
        if opener in prompt and prompt.count("<|im_start|>assistant") == 1:
            return fake.call_text(names[0], {"padding": "x" * 2 * request.sampling.max_new_tokens})
        return fake.call_text(names[0], _minimal(tools[names[0]]))

    return reply


async def test_openai_mode_on_the_fake_backend(cfg, fake, tmp_path):
    """The openai mode end to end on the fake backend (real server, real socket, the openai
    package): every turn re-sends the whole history, cached_tokens come from the server's usage,
    and the mode is reported like the others."""
    from bench import report
    from bench.runner import run_benchmark
    from runtime.service import AgentRuntime

    spec = dataclasses.replace(PRESETS["tiny"], turns=3, tools=2, call_max_tokens=400, text_max_tokens=16)
    renderer = AgentRuntime(cfg, fake).renderer
    workload = build_workload(spec, count_tokens=lambda s: len(renderer.tokenizer.encode(s, add_special_tokens=False)),
                              prefix_len=lambda system, tools: len(renderer.prefix_ids(system, AgentRuntime.check_tools(tools))))
    fake.reply = _scripted(fake, workload)
    fake.requests.clear()
    results = await run_benchmark(spec, ["server", "engine", "openai"], cfg=cfg, backend=fake, show_progress=False, preset="tiny")
    modes, turns = results["modes"], results["turns"]
    total = spec.sessions * spec.turns
    for name in ("server", "engine", "openai"):
        assert modes[name]["turns"] == total and modes[name]["errors"] == 0, modes[name]["error_samples"]
        assert modes[name]["tool_call_turns"] > 0 and modes[name]["hit_vs_theoretical"] is not None
        assert 0 < modes[name]["ttft_ms_p50"] <= modes[name]["e2e_ms_p95"], name
    # Jump-forward: the same turns force the same call openings in every mode (decode steps saved).
    forcing = any(t.tool_choice == "required" or isinstance(t.tool_choice, dict) for sp in workload.sessions for t in sp.turns)
    assert forcing and modes["server"]["forced_tokens"] > 0
    assert modes["server"]["forced_tokens"] == modes["engine"]["forced_tokens"] == modes["openai"]["forced_tokens"]
    o = modes["openai"]
    # Stateless: each request carries the system prompt and the session's first user message.
    oai = [r for r in fake.requests if r.rid.startswith("oai-")]
    assert len(oai) == total + 1  # the measured turns and the warm-up turn
    measured = oai[1:]

    def prompt_tokens(r):  # usage counts the prompt; a call's forced opening (jump-forward) is output
        text = fake.tokenizer.decode(r.input_ids)
        forced = text[text.rfind("<|im_start|>assistant\n") + len("<|im_start|>assistant\n"):]
        return len(r.input_ids) - len(fake.tokenizer.encode(forced, add_special_tokens=False))

    assert o["prompt_tokens"] == sum(prompt_tokens(r) for r in measured)
    for r in measured:
        text = fake.tokenizer.decode(r.input_ids)
        assert workload.agents[0].system_prompt in text
        assert sum(s.user_messages[0] in text for s in workload.sessions) == 1
    # The later turns carry the earlier ones: prompts grow within a session, and they are served
    # from what the session computed before (the server's count, never over the ids' maximum).
    by = {(t["session"], t["turn"]): t for t in turns["openai"]}
    for s in range(spec.sessions):
        assert by[(s, 1)]["prompt_tokens"] < by[(s, 2)]["prompt_tokens"] < by[(s, 3)]["prompt_tokens"]
        assert by[(s, 3)]["cached_tokens"] > by[(s, 2)]["prompt_tokens"]
    assert by[(1, 1)]["finish_reason"] == "length" and by[(1, 1)]["tool_calls"] == 0
    # The ids the server and openai modes rebuild for the theoretical maximum give what the engine
    # mode's own ids give, the cut-off turn's next one included (the session kept none of its output).
    exact = {(t["session"], t["turn"]): t["theoretical_cached"] for t in turns["engine"] if t["turn"] > 1}
    for mode in ("server", "openai"):
        assert {(t["session"], t["turn"]): t["theoretical_cached"] for t in turns[mode] if t["turn"] > 1} == exact, mode
    assert o["prompt_tokens_cached"] == sum(t["cached_tokens"] for t in turns["openai"])
    # TTFT is the server's own (its Server-Timing header), a part of the client's end-to-end time.
    assert all(0 < t["ttft_ms"] < t["e2e_ms"] for t in turns["openai"])
    assert o["prompt_tokens_cached"] <= o["theoretical_cached_tokens"] + o["turns"]
    assert o["hit_vs_theoretical_after_turn_1"] > 0.9  # the fake renders calls canonically: nothing is lost
    # Turn 1 is rendered exactly as session.open + the first message: the same prompts as the server's.
    first = lambda mode: sorted((t["session"], t["prompt_tokens"]) for t in turns[mode] if t["turn"] == 1)  # noqa: E731
    assert first("openai") == first("server")
    assert results["checks"]["server_vs_openai_parity"]["turns"] == total
    assert {"openai hit rate / theoretical maximum", "openai hit rate / theoretical maximum, turns 2+"} <= {
        t["target"] for t in results["targets"]}

    report.write(results, tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["modes"]["openai"]["prompt_tokens_cached"] == o["prompt_tokens_cached"]
    assert "stateless client" in data["modes"]["openai"]["description"]
    md = (tmp_path / "results.md").read_text()
    assert "| openai |" in md and "server vs openai parity" in md


@pytest.mark.engine
async def test_bench_end_to_end_tiny(cfg, backend, tmp_path):
    from bench import report
    from bench.runner import run_benchmark

    spec = PRESETS["tiny"]
    results = await run_benchmark(spec, list(ALL_MODES), cfg=cfg, backend=backend, show_progress=False, preset="tiny")
    assert backend.is_ready(), "the benchmark must leave a backend it was given running"

    modes = results["modes"]
    assert set(modes) == set(ALL_MODES)
    expected_turns = spec.sessions * spec.turns
    for name, m in modes.items():
        for key in ("turns_per_s", "output_tokens_per_s", "hit_rate", "theoretical_hit_rate", "ttft_ms_p50",
                    "ttft_ms_p95", "e2e_ms_p50", "e2e_ms_p95", "prompt_tokens_computed", "prompt_tokens_cached",
                    "peak_rss_mb", "ttft_by_turn"):
            assert key in m, (name, key)
        assert m["turns"] + m["errors"] == expected_turns, name
        assert m["turns"] > 0 and m["turns_per_s"] > 0 and m["output_tokens"] > 0, name
        assert 0.0 <= m["hit_rate"] <= 1.0 and 0.0 < m["theoretical_hit_rate"] <= 1.0, name
        # nothing serves more from the cache than the token ids allow (one token of slack per turn)
        assert m["prompt_tokens_cached"] <= m["theoretical_cached_tokens"] + m["turns"], name
        assert m["prompt_tokens_computed"] + m["prompt_tokens_cached"] == m["prompt_tokens"], name
        assert 0 < m["ttft_ms_p50"] <= m["ttft_ms_p95"] and 0 < m["e2e_ms_p50"] <= m["e2e_ms_p95"], name
        assert m["ttft_ms_p50"] <= m["e2e_ms_p95"], name
        assert m["peak_rss_mb"] > 100, name
        assert sorted(int(t) for t in m["ttft_by_turn"]) == list(range(1, spec.turns + 1)), name

    for name in ("server", "engine", "rerender", "openai"):  # in this process: its CPU time is reported
        assert modes[name]["host_cpu_s"] > 0, name
        # spans the engine's scheduler jumped over: read back from it, never under 2 tokens a span
        assert modes[name]["forced_tokens_mid_call"] >= 2 * modes[name]["forced_spans_mid_call"] >= 0, name
    # The grammar makes every call valid: the session modes lose no turn, nor does a client that
    # re-sends the calls with re-serialized arguments.
    assert modes["server"]["errors"] == 0 and modes["engine"]["errors"] == 0 and modes["openai"]["errors"] == 0
    # Without a prefix cache nothing is served from one.
    assert modes["no-radix"]["hit_rate"] == 0.0 and modes["hf"]["hit_rate"] == 0.0
    # Sessions reuse what was computed: the server gets (nearly) everything the ids allow.
    assert modes["server"]["hit_vs_theoretical"] >= 0.95
    assert modes["server"]["theoretical_hit_rate"] == pytest.approx(modes["engine"]["theoretical_hit_rate"], abs=0.02)

    turns = results["turns"]
    # server and engine send the same token ids: turn 1 is fully determined by the workload
    first = lambda mode: {(t["session"], t["prompt_tokens"]) for t in turns[mode] if t["turn"] == 1}  # noqa: E731
    assert first("server") == first("engine") == first("no-radix") == first("openai")
    # hf replays the reference's prompts and writes exactly as many tokens per turn
    ref = {(t["session"], t["turn"]): t for t in turns[modes["hf"]["reference_mode"]] if t["error"] is None}
    for t in turns["hf"]:
        r = ref[(t["session"], t["turn"])]
        assert (t["prompt_tokens"], t["completion_tokens"]) == (r["prompt_tokens"], r["completion_tokens"])

    assert results["workload"]["total_turns"] == expected_turns
    assert results["machine"]["cpu_count"] >= 1
    assert {t["target"] for t in results["targets"]} >= {"server hit rate / theoretical maximum"}

    paths = report.write(results, tmp_path)
    names = {p.name for p in paths}
    assert names == {"results.json", "results.md", "ttft_by_turn.png", "throughput.png"}
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data) >= {"modes", "workload", "machine"}
    assert data["modes"]["server"]["turns_per_s"] == pytest.approx(modes["server"]["turns_per_s"])
    md = (tmp_path / "results.md").read_text()
    assert "| mode | turns/s" in md and all(f"| {m} " in md for m in ALL_MODES)
    assert ("Forced in the middle of the output" in md) == any(m.get("forced_tokens_mid_call") for m in modes.values())
    for png in ("ttft_by_turn.png", "throughput.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
