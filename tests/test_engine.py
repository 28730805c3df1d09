"""The real SGLang engine on the default model (started once per test session)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from runtime.backends import GenRequest, Sampling

pytestmark = pytest.mark.engine


def chat_ids(tokenizer, text: str) -> list[int]:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(prompt, add_special_tokens=False)


async def run(backend, ids, **sampling):
    last = None
    async for update in backend.stream(GenRequest(rid=uuid.uuid4().hex, input_ids=ids, sampling=Sampling(**sampling))):
        last = update
    return last


async def test_engine_info_reports_what_runs(backend):
    info = backend.info
    assert info.name == "embedded" and info.device in ("cpu", "cuda")
    assert info.context_length == 8192 and info.kv_capacity_tokens > 0
    assert backend.is_ready()


async def test_greedy_capital_of_france_and_prefix_cache(backend):
    ids = chat_ids(backend.tokenizer, "Name the capital of France.")  # a clear greedy margin: see test_server.FRANCE
    first = await run(backend, ids, max_new_tokens=24)
    assert "Paris" in first.text
    assert first.finish_reason == "stop" and first.prompt_tokens == len(ids)
    second = await run(backend, ids, max_new_tokens=24)
    assert second.text == first.text  # greedy is deterministic
    assert second.cached_tokens > 0
    assert second.cached_tokens >= len(ids) - 1  # everything but the last prompt token


async def test_cancel_frees_the_engine_request(backend):
    ids = backend.tokenizer.encode("Once upon a time, in a land far away,")

    async def consume():
        async for _ in backend.stream(GenRequest(rid="cancel-me", input_ids=ids,
                                                 sampling=Sampling(max_new_tokens=400, temperature=0.8, seed=1))):
            pass

    task = asyncio.create_task(consume())
    for _ in range(100):  # wait until the engine runs it
        await asyncio.sleep(0.1)
        if await backend.engine_requests():
            break
    assert await backend.engine_requests() == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    for _ in range(50):
        if await backend.engine_requests() == 0:
            break
        await asyncio.sleep(0.1)
    assert await backend.engine_requests() == 0
    assert backend.inflight() == 0


async def test_an_idle_engine_does_not_spin(backend):
    # SGLang's scheduler busy-polls its sockets unless sleep_on_idle is set: on a 2-core host
    # that is a core taken from the server's own process. Idle, it should use almost no CPU.
    import psutil

    await asyncio.sleep(1.0)  # let anything still finishing settle
    procs = [psutil.Process(pid) for pid in backend.child_pids() if psutil.pid_exists(pid)]
    assert procs, "the engine's processes are not known"
    before = {p.pid: sum(p.cpu_times()[:2]) for p in procs}
    await asyncio.sleep(3.0)
    used = {p.pid: sum(p.cpu_times()[:2]) - before[p.pid] for p in procs}
    # a busy loop would use ~3 s here (or most of a contended core); a waiting one ~0
    assert max(used.values()) < 1.0, used
