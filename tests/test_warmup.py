"""Shared prefix warm-ups (runtime.warmup): sessions opened together and stateless conversations of
one agent that start together compute its prefix once, on the fake backend through the runtime."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from conftest import test_config
from protocol.models import GenerateRequestParams
from runtime.backends.fake import FakeBackend
from runtime.metrics import METRICS
from runtime.service import AgentRuntime
from runtime.warmup import MIN_SHARED_WARM_TOKENS, SharedWarmups

SYSTEM = "You are a careful support agent. " * 20  # > MIN_SHARED_WARM_TOKENS tokens on the fake (one per byte)
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Look a thing up.", "parameters": {
    "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}]


async def _turn(rt, question: str, *, system: str = SYSTEM, tools=TOOLS):
    params = GenerateRequestParams.model_validate({"system_prompt": system, "tools": tools, "tool_choice": "none",
                                                   "messages": [{"role": "user", "content": question}]})

    async def emit(kind, payload):
        return None

    return await rt.generate(params, owner="", emit=emit, cancelled=asyncio.Event())


def _gather_ensures(rt, n: int) -> None:
    """Hold every warm-up until n callers have asked for one: "together", even on a loaded host."""
    arrived, all_in, ensure = [], asyncio.Event(), rt.warmups.ensure

    async def gathered_ensure(key, warm):
        arrived.append(key)
        if len(arrived) == n:
            all_in.set()

        async def gated():
            with contextlib.suppress(TimeoutError):  # fewer callers (a failure): not a hang
                await asyncio.wait_for(all_in.wait(), 10)
            await warm()

        await ensure(key, gated)

    rt.warmups.ensure = gathered_ensure  # type: ignore[method-assign]


@pytest.mark.parametrize("radix", [True, False])
async def test_conversations_starting_together_compute_the_prefix_once(radix):
    fake = FakeBackend(radix_cache=radix, token_delay_s=0.001)
    await fake.start()
    rt = AgentRuntime(test_config(), fake)
    prefix = len((await rt._prefix(SYSTEM, rt.check_tools(TOOLS)))[1])
    assert prefix >= MIN_SHARED_WARM_TOKENS
    # "Together": the warm-up does not start before all four have asked for it (on a loaded host
    # the last one could otherwise arrive after it finished, and rightly warm again).
    _gather_ensures(rt, 4)
    outs = await asyncio.gather(*(_turn(rt, f"question {i}") for i in range(4)))
    warms = [r for r in fake.requests if r.rid.startswith("warm-")]
    if not radix:  # nothing to share: no warm-up
        assert warms == [] and all(o.cached_tokens == 0 for o in outs)
        return
    assert len(warms) == 1 and warms[0].input_ids == fake.requests[-1].input_ids[:prefix]
    assert all(o.error is None and o.cached_tokens >= prefix for o in outs), [o.cached_tokens for o in outs]
    # A later first turn warms again (the engine may have evicted the prefix meanwhile): one short
    # request when it is still cached. A short prefix is not worth a round trip.
    await _turn(rt, "another conversation")
    assert len([r for r in fake.requests if r.rid.startswith("warm-")]) == 2
    await _turn(rt, "hi", system="Short.", tools=None)
    assert len([r for r in fake.requests if r.rid.startswith("warm-")]) == 2
    assert rt.active == 0


async def test_sessions_of_one_agent_opened_together_compute_its_prefix_once():
    fake = FakeBackend(radix_cache=True, token_delay_s=0.001)
    await fake.start()
    rt = AgentRuntime(test_config(), fake)
    other = "You answer questions about invoices. " * 20
    _gather_ensures(rt, 7)
    computed = METRICS.warmup_tokens._value.get()
    opens = [rt.open_session(system_prompt=SYSTEM, tools=TOOLS, owner="") for _ in range(4)]
    opens += [rt.open_session(system_prompt=other, tools=TOOLS, owner="") for _ in range(2)]
    opened = await asyncio.gather(*opens, _turn(rt, "a stateless conversation of the first agent"))
    warms = [r for r in fake.requests if r.rid.startswith("warm-")]
    # one warm-up per agent, shared by its sessions and by the stateless conversation's first turn
    assert sorted(len(r.input_ids) for r in warms) == sorted([opened[0].prefix_tokens, opened[4].prefix_tokens])
    assert rt.warmups.started == 2 and len({o.session_id for o in opened[:6]}) == 6 and rt.active == 0
    # what they computed is counted (the bench reports it): each prefix once
    assert METRICS.warmup_tokens._value.get() - computed == opened[0].prefix_tokens + opened[4].prefix_tokens
    # a session opened later warms again: one short request while the prefix is still cached
    await rt.open_session(system_prompt=SYSTEM, tools=TOOLS, owner="")
    assert rt.warmups.started == 3
    assert METRICS.warmup_tokens._value.get() - computed == opened[0].prefix_tokens + opened[4].prefix_tokens + 1


async def test_a_waiter_that_goes_away_does_not_cancel_the_shared_warm_up():
    shared = SharedWarmups()
    started, release = asyncio.Event(), asyncio.Event()
    ran: list[str] = []

    async def warm():
        started.set()
        await release.wait()
        ran.append("warmed")

    first = asyncio.create_task(shared.ensure(b"k", warm))
    await started.wait()
    second = asyncio.create_task(shared.ensure(b"k", warm))
    await asyncio.sleep(0)
    first.cancel()  # the request that started it goes away
    release.set()
    await second
    assert ran == ["warmed"] and shared.started == 1
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_a_failed_warm_up_fails_its_waiters_and_the_next_one_runs_again():
    shared = SharedWarmups()

    async def fail():
        raise RuntimeError("engine gone")

    with pytest.raises(RuntimeError):
        await shared.ensure(b"k", fail)
    ran = []

    async def ok():
        ran.append(1)

    await shared.ensure(b"k", ok)
    assert ran == [1] and shared.started == 2
