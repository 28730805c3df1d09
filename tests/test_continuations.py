"""Exact tokens for re-sent histories (runtime.continuations): the store on its own, and the
drift cases over /v1/chat/completions with the `openai` package on the fake backend over a real
socket. Each drift case shows the history really drifts (the same request with the store off
loses cached tokens) and that with the store the turn continues from the exact ids.

The fake backend generates one token per byte and reports as cached the longest prefix of the
prompt it computed before (prompt + output of earlier requests), like a radix cache."""

from __future__ import annotations

import contextlib
import json

import openai
import pytest

from conftest import running_server, test_config
from runtime.continuations import ContinuationStore, HistoryDigest, candidates, normalized
from runtime.metrics import METRICS

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                   "required": ["city", "unit"]}}}
SYSTEM = {"role": "system", "content": "You are a weather agent."}
ASK = {"role": "user", "content": "Weather in Paris?"}


# ---------------------------------------------------------------------------- the store alone
def digest_of(messages, system="s", tools=()):
    found, _ = candidates(system, list(tools), messages)
    return found


def test_normalization_is_loose_where_clients_drift_and_strict_elsewhere():
    a = {"role": "assistant", "content": None, "tool_calls": [{"call_id": "c1", "name": "f", "arguments": {"a": 1, "b": [1, 2]}}]}
    b = {"role": "assistant", "content": "  ", "reasoning": "dropped",
         "tool_calls": [{"call_id": "c1", "name": "f", "arguments": {"b": [1, 2], "a": 1}}]}
    assert normalized(a) == normalized(b)
    assert normalized({"role": "developer", "content": "x "}) == normalized({"role": "system", "content": "x"})
    for changed in ({"arguments": {"a": 2, "b": [1, 2]}}, {"call_id": "c2"}, {"name": "g"}):
        other = {**a, "tool_calls": [{**a["tool_calls"][0], **changed}]}
        assert normalized(other) != normalized(a), changed
    assert normalized({"role": "user", "content": "hi"}) != normalized({"role": "user", "content": "hi!"})


def test_digests_chain_over_system_tools_and_every_message():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "q3"}]
    found = digest_of(msgs)
    assert [c.index for c in found] == [3, 1]  # deepest first
    assert digest_of(msgs, system="other")[1].digest != found[1].digest
    assert digest_of(msgs, tools=[WEATHER])[1].digest != found[1].digest
    edited = [dict(m) for m in msgs]
    edited[0]["content"] = "Q"
    assert all(x.digest != y.digest for x, y in zip(digest_of(edited), found, strict=True))
    # The reply's digest continues the request's: what a turn records is what the next request finds.
    _, running = candidates("s", [], msgs[:3])
    assert running.add(msgs[3]) == found[0].digest


def test_lookup_is_deepest_first_per_owner_and_reports_edits():
    store = ContinuationStore(max_bytes=1 << 20, ttl_s=60)
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [{"call_id": "call_1", "name": "f", "arguments": {}}]},
            {"role": "tool", "content": "r", "tool_call_id": "call_1"},
            {"role": "assistant", "content": "done"}, {"role": "user", "content": "again"}]
    found = digest_of(msgs)
    store.record("k1", found[1].digest, [1, 2, 3], open_turn=False, call_ids=("call_1",))
    assert store.lookup("k1", found)[1][0].index == 1
    store.record("k1", found[0].digest, [1, 2, 3, 4, 5], open_turn=True, call_ids=())
    outcome, hit = store.lookup("k1", found)
    assert outcome == "exact" and hit[0].index == 3 and list(hit[1].ids) == [1, 2, 3, 4, 5] and hit[1].open_turn
    assert store.lookup("k2", found) == ("none", None)  # never across owners
    edited = [dict(m) for m in msgs]
    edited[0]["content"] = "edited question"
    assert store.lookup("k1", digest_of(edited)) == ("edited", None)  # minted call_1, history changed


def test_store_is_bounded_in_bytes_per_owner_and_by_ttl(monkeypatch):
    import runtime.continuations as mod

    entry_bytes = mod.ENTRY_OVERHEAD_BYTES + 4 * 100
    store = ContinuationStore(max_bytes=3 * entry_bytes, ttl_s=10)
    keys = [bytes([i]) * 32 for i in range(5)]
    for k in keys:
        store.record("k", k, list(range(100)), open_turn=False, call_ids=())
        store.record("other", k, list(range(100)), open_turn=False, call_ids=())
    assert store.used_bytes("k") <= 3 * entry_bytes and len(store) == 6  # the three most recent of each owner
    cand = mod.Candidate(0, keys[0], ())
    assert store.lookup("k", [cand]) == ("none", None)  # least recently used went first
    assert store.lookup("k", [mod.Candidate(0, keys[4], ())])[0] == "exact"
    store.record("k", b"x" * 32, list(range(10_000)), open_turn=False, call_ids=())  # larger than the bound: not kept
    assert store.lookup("k", [mod.Candidate(0, b"x" * 32, ())])[0] == "none" and store.used_bytes("k") <= 3 * entry_bytes
    now = mod.time.monotonic()
    monkeypatch.setattr(mod.time, "monotonic", lambda: now + 11)
    assert store.lookup("k", [mod.Candidate(0, keys[4], ())])[0] == "none" and store.used_bytes("k") == 0
    off = ContinuationStore(max_bytes=0, ttl_s=10)
    off.record("k", keys[0], [1], open_turn=False, call_ids=())
    assert not off.enabled and len(off) == 0


def test_history_digest_copy_is_independent():
    d = HistoryDigest("s", [])
    d.add({"role": "user", "content": "a"})
    c = d.copy()
    assert c.add({"role": "assistant", "content": "x"}) != d.add({"role": "assistant", "content": "y"})


# ---------------------------------------------------------------------------- over /v1, on the fake
@contextlib.asynccontextmanager
async def api(fake, **env):
    cfg = test_config(**env)
    assert await fake.flush_cache()  # cached_tokens from this test's requests only
    async with running_server(cfg, fake) as (addr, app):
        clients = []

        def client(key: str = "k1") -> openai.AsyncOpenAI:
            c = openai.AsyncOpenAI(base_url=f"http://{addr}/v1", api_key=key, max_retries=0)
            clients.append(c)
            return c

        try:
            yield client, app
        finally:
            for c in clients:
                await c.close()


def outputs(fake, text: str) -> list[int]:
    tok = fake.tokenizer
    return list(tok.encode(text, add_special_tokens=False)) + [tok.eos_token_id]


def counted(outcome: str) -> float:
    return METRICS.continuations.labels(outcome=outcome)._value.get()


async def tool_turn(client, fake, args_text: str = '{"city":"Paris","unit":"c"}'):
    """Turn 1: the model calls get_weather; returns (response, its prompt ids, its output ids)."""
    reply = fake.call_text("get_weather", json.loads(args_text))
    fake.replies.append(reply)
    r = await client.chat.completions.create(model="m", messages=[SYSTEM, ASK], tools=[WEATHER], tool_choice="required")
    assert r.choices[0].finish_reason == "tool_calls"
    # The engine got the prompt + the call's forced opening (jump-forward), which is output.
    return r, list(fake.requests[-1].input_ids)[: r.usage.prompt_tokens], outputs(fake, reply)


def resend(r, arguments: str, *, content=None, extra=None):
    call = r.choices[0].message.tool_calls[0]
    assistant = {"role": "assistant", "content": content,
                 "tool_calls": [{"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}],
                 **(extra or {})}
    return [SYSTEM, ASK, assistant, {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"}]


async def second_turn(client, fake, history, reply="It is sunny.", tools=(WEATHER,)):
    fake.replies.append(reply)
    r = await client.chat.completions.create(model="m", messages=history, tools=list(tools) or openai.omit)
    return r, list(fake.requests[-1].input_ids)


@pytest.mark.parametrize("store", ["on", "off"])
async def test_reserialized_arguments_continue_from_the_exact_ids(fake, store):
    # LangChain keeps arguments as a dict and sends json.dumps of it back; this client also
    # changes the key order. The runtime emitted compact JSON with the model's key order.
    env = {} if store == "on" else {"INFERENCE_CONTINUATION_BYTES": "0"}
    async with api(fake, **env) as (client, _):
        c = client()
        r1, p1, o1 = await tool_turn(c, fake)
        exact = counted("exact")
        history = resend(r1, json.dumps({"unit": "c", "city": "Paris"}))
        r2, p2 = await second_turn(c, fake, history)
        cached = r2.usage.prompt_tokens_details.cached_tokens
        if store == "on":
            assert p2[: len(p1) + len(o1)] == p1 + o1  # the model's own tokens, then the new messages
            assert cached == len(p1) + len(o1) and counted("exact") == exact + 1
        else:  # the re-rendering drifts at the arguments: the cache stops there
            assert p2[: len(p1) + len(o1)] != p1 + o1 and cached < len(p1) + len(o1) - 5
        assert r2.choices[0].message.content == "It is sunny."


async def test_verbatim_resend_from_new_connections_over_three_turns(fake):
    async with api(fake) as (client, _):
        r1, p1, o1 = await tool_turn(client(), fake)
        history = resend(r1, r1.choices[0].message.tool_calls[0].function.arguments)
        fake.replies.append(fake.call_text("get_weather", {"city": "Lyon", "unit": "c"}))
        r2 = await client().chat.completions.create(model="m", messages=history, tools=[WEATHER], tool_choice="required")
        p2 = list(fake.requests[-1].input_ids)[: r2.usage.prompt_tokens]
        o2 = outputs(fake, fake.call_text("get_weather", {"city": "Lyon", "unit": "c"}))
        assert r2.usage.prompt_tokens_details.cached_tokens == len(p1) + len(o1)
        call2 = r2.choices[0].message.tool_calls[0]
        history += [{"role": "assistant", "content": None, "tool_calls": [call2.model_dump()]},
                    {"role": "tool", "tool_call_id": call2.id, "content": "15 C"}]
        r3, p3 = await second_turn(client(), fake, history, "Paris is warmer.")
        assert p3[: len(p2) + len(o2)] == p2 + o2
        assert r3.usage.prompt_tokens_details.cached_tokens == len(p2) + len(o2)


async def test_whitespace_and_dropped_reasoning_still_continue(fake):
    import programs

    async with api(fake) as (client, app):
        runtime = app.state.server.runtime
        runtime._fmt, runtime._renderer = programs.FORMATS["qwen3"], None  # a reasoning format on the fake's ChatML
        c = client()
        reply = "<think>Paris, so: sunny.</think>\n\n  Sunny in Paris.  "
        fake.replies.append(reply)
        r1 = await c.chat.completions.create(model="m", messages=[SYSTEM, ASK])
        p1, o1 = list(fake.requests[-1].input_ids), outputs(fake, reply)
        assert r1.choices[0].message.reasoning_content  # streamed apart from the text
        # The client keeps only the stripped text: no reasoning, no surrounding spaces.
        history = [SYSTEM, ASK, {"role": "assistant", "content": r1.choices[0].message.content.strip()},
                   {"role": "user", "content": "And tomorrow?"}]
        r2, p2 = await second_turn(c, fake, history, "Rain.", tools=())
        assert p2[: len(p1) + len(o1)] == p1 + o1  # the model sees the reasoning it wrote
        assert r2.usage.prompt_tokens_details.cached_tokens == len(p1) + len(o1)
        rendered = runtime.renderer.full_ids(SYSTEM["content"], [], history[1:])
        assert rendered[: len(p1) + len(o1)] != p1 + o1  # what a re-rendering would have sent instead


async def test_edited_history_falls_back_to_a_full_rendering(fake):
    async with api(fake) as (client, app):
        c = client()
        r1, p1, o1 = await tool_turn(c, fake)
        edited = resend(r1, '{"city":"Berlin","unit":"c"}')  # the client changed what the model called
        edits = counted("edited")
        r2, p2 = await second_turn(c, fake, edited)
        runtime = app.state.server.runtime
        system, messages = SYSTEM["content"], [m.model_dump(exclude_none=True) for m in _params(edited).messages]
        assert p2 == runtime.renderer.full_ids(system, runtime.check_tools([WEATHER]), messages)
        assert counted("edited") == edits + 1
        assert "Berlin" in fake.tokenizer.decode(p2)
        assert r2.usage.prompt_tokens_details.cached_tokens < len(p1) + len(o1)


async def test_a_retried_turn_forks_from_the_turn_before(fake):
    async with api(fake) as (client, _):
        c = client()
        r1, p1, o1 = await tool_turn(c, fake)
        history = resend(r1, r1.choices[0].message.tool_calls[0].function.arguments)
        _, first = await second_turn(c, fake, history, "Sunny.")
        retry, again = await second_turn(c, fake, history, "Warm and sunny.")
        assert again == first and again[: len(p1) + len(o1)] == p1 + o1
        assert retry.choices[0].message.content == "Warm and sunny."
        # Each branch continues on its own: the retried answer is the one this client keeps.
        follow = history + [{"role": "assistant", "content": "Warm and sunny."}, {"role": "user", "content": "Thanks"}]
        _, p3 = await second_turn(c, fake, follow, "You're welcome.")
        assert p3[: len(again) + len(outputs(fake, "Warm and sunny."))] == again + outputs(fake, "Warm and sunny.")


async def test_another_api_key_never_matches(fake):
    async with api(fake, INFERENCE_API_KEY="key-one,key-two") as (client, _):
        r1, p1, o1 = await tool_turn(client("key-one"), fake)
        history = resend(r1, json.dumps({"unit": "c", "city": "Paris"}))
        none = counted("none")
        _, p2 = await second_turn(client("key-two"), fake, history)
        assert counted("none") == none + 1
        assert p2[: len(p1) + len(o1)] != p1 + o1  # rendered: key-two gets nothing key-one generated
        _, p3 = await second_turn(client("key-one"), fake, history)
        assert p3[: len(p1) + len(o1)] == p1 + o1


def _params(messages):
    from protocol.fields import RequestLimits
    from runtime.openai_wire import ChatCompletionRequest, to_generate

    req = ChatCompletionRequest.model_validate({"model": "m", "messages": messages, "tools": [WEATHER]})
    return to_generate(req, RequestLimits())[0]


# ---------------------------------------------------------------------------- the real model
@pytest.mark.engine
async def test_engine_reserialized_and_edited_histories(server):
    """The default model over /v1: a history re-sent with LangChain's json.dumps arguments is
    cached up to the new messages; an edited one falls back to a rendering (still answered)."""
    addr, _ = server
    async with openai.AsyncOpenAI(base_url=f"http://{addr}/v1", api_key="k", max_retries=0) as c:
        ask = [SYSTEM, {"role": "user", "content": f"Weather in Paris? ({__name__} exact tokens)"}]
        r1 = await c.chat.completions.create(model="m", messages=ask, tools=[WEATHER], tool_choice="required",
                                             max_tokens=48)
        assert r1.choices[0].finish_reason == "tool_calls"
        call = r1.choices[0].message.tool_calls[0]
        args = json.loads(call.function.arguments)
        # Spaces as json.dumps writes them (LangChain), and the keys in another order.
        reserialized = json.dumps(dict(reversed(list(args.items()))), indent=1)
        assert json.loads(reserialized) == args and reserialized != call.function.arguments
        turn1 = r1.usage.prompt_tokens + r1.usage.completion_tokens

        def history(arguments: str) -> list[dict]:
            return ask + [{"role": "assistant", "content": None, "tool_calls": [
                {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"}]

        r2 = await c.chat.completions.create(model="m", messages=history(reserialized), tools=[WEATHER],
                                             tool_choice="required", max_tokens=48)
        assert r2.usage.prompt_tokens_details.cached_tokens >= turn1 - 1  # all but the new messages
        assert r2.choices[0].message.tool_calls
        edited = json.dumps({**args, "city": "Berlin, Germany"})
        r3 = await c.chat.completions.create(model="m", messages=history(edited), tools=[WEATHER],
                                             tool_choice="required", max_tokens=48)
        assert r3.choices[0].message.tool_calls  # answered from a full rendering
        assert r3.usage.prompt_tokens_details.cached_tokens < turn1 - 1


@pytest.mark.engine
async def test_engine_verbatim_fork_and_another_key(cfg, backend):
    """The default model over /v1, a server with two API keys on the session's engine: a verbatim
    re-send from a new client continues exactly, a retried turn forks from the turn before, and
    the other key's identical history is rendered (nothing of the first key's is matched)."""
    from conftest import running_server

    async with running_server(cfg.replace(api_key="key-a,key-b"), backend) as (addr, app):
        def client(key: str) -> openai.AsyncOpenAI:
            return openai.AsyncOpenAI(base_url=f"http://{addr}/v1", api_key=key, max_retries=0)

        ask = [SYSTEM, {"role": "user", "content": f"Weather in Oslo? ({__name__} keys)"}]
        async with client("key-a") as a:
            r1 = await a.chat.completions.create(model="m", messages=ask, tools=[WEATHER], tool_choice="required",
                                                 max_tokens=48)
        call = r1.choices[0].message.tool_calls[0]
        turn1 = r1.usage.prompt_tokens + r1.usage.completion_tokens
        history = ask + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                         {"role": "tool", "tool_call_id": call.id, "content": "-3 C, snow"}]
        exact = counted("exact")
        for _ in range(2):  # the same turn twice, each from a new client: both fork from turn 1
            async with client("key-a") as a:
                r = await a.chat.completions.create(model="m", messages=history, tools=[WEATHER], tool_choice="none",
                                                    max_tokens=8)
            assert r.usage.prompt_tokens_details.cached_tokens >= turn1 - 1
        assert counted("exact") == exact + 2
        none = counted("none")
        async with client("key-b") as b:
            r = await b.chat.completions.create(model="m", messages=history, tools=[WEATHER], tool_choice="none",
                                                max_tokens=8)
        assert counted("none") == none + 1 and r.choices[0].finish_reason in ("stop", "length")
        assert app.state.server.runtime.continuations.used_bytes(app.state.server.owner_for(
            {"authorization": "Bearer key-b"})) > 0  # key-b's own turn, recorded under key-b
