"""The benchmark's modes: one session loop, a driver per way of serving a turn.

Every mode runs the same `Workload` through `run_sessions`: C sessions in flight, each opening
(session.open or its equivalent) and then playing its T turns one after the other. A turn's
input is the tool results for the calls of the previous model turn when it made any (content
from the workload, keyed by session/turn/tool name), else the session's next user message.

Drivers (what differs between modes):
- ServerDriver   this runtime over a real WebSocket: session.open, generate with session_id
                 (only the new messages), notifications, stream_end usage and timings.
- EngineDriver   the server without the socket: runtime.service.AgentRuntime called in
                 process, exactly as the WebSocket front end calls it (session.open, generate
                 with session_id). What `server` adds over it is the protocol and the socket.
                 On an engine started with radix_cache=False it is `no-radix`.
- RerenderDriver a naive stateless client: it keeps the message history, and each turn the
                 whole history is rendered to one text and tokenized again (what an
                 OpenAI-style server does with `messages`), then runs the runtime's own turn
                 (runtime.turn) on the radix-cache engine.
The `openai` mode (bench.openai_mode) is a stateless client of the server's /v1/chat/completions;
the `hf` mode (bench.hf) replays another mode's token ids with transformers generate, and
the `llamacpp` mode (bench.llamacpp) replays them on llama.cpp's own server.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.metrics import Clock, TurnRecord
from bench.workload import SessionPlan, TurnPlan, Workload


@dataclass
class TurnResult:
    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float = 0.0
    e2e_ms: float = 0.0
    prompt_ids: list[int] | None = None
    output_ids: list[int] | None = None
    error: str | None = None


def choice_label(choice: Any) -> str:
    return choice if isinstance(choice, str) else "named"


async def run_sessions(
    workload: Workload,
    driver: Any,
    *,
    concurrency: int,
    on_turn: Callable[[TurnRecord], None] | None = None,
) -> tuple[list[TurnRecord], float]:
    """Play every session of `workload` through `driver`; returns (records, wall seconds).
    Wall time runs from the first session.open to the last turn's end."""
    clock = Clock()
    sem = asyncio.Semaphore(concurrency)
    records: list[TurnRecord] = []

    async def play(sp: SessionPlan) -> None:
        async with sem:
            try:
                handle = await driver.open(sp)
            except Exception as exc:  # the session never opened: each of its turns is a failure
                for t, plan in enumerate(sp.turns):
                    rec = TurnRecord(session=sp.index, turn=t + 1, agent=sp.agent, input_kind="user",
                                     tool_choice=choice_label(plan.tool_choice), finish_reason="error",
                                     error=f"session open failed: {type(exc).__name__}: {exc}")
                    rec.t_start = rec.t_end = clock.now()
                    records.append(rec)
                    if on_turn is not None:
                        on_turn(rec)
                return
            try:
                calls: list[dict[str, Any]] = []
                next_user = 0
                for t, plan in enumerate(sp.turns):
                    if calls:
                        kind = "tool"
                        messages = [
                            {"role": "tool", "tool_call_id": c["call_id"],
                             "content": workload.tool_result(sp.index, t, i, c["name"])}
                            for i, c in enumerate(calls)
                        ]
                    else:
                        kind = "user"
                        messages = [{"role": "user", "content": sp.user_messages[next_user]}]
                        next_user += 1
                    rec = TurnRecord(session=sp.index, turn=t + 1, agent=sp.agent, input_kind=kind,
                                     tool_choice=choice_label(plan.tool_choice))
                    # What a session renders for them (tool results carry their call's name).
                    rec.new_messages = [dict(m, name=c["name"]) for m, c in zip(messages, calls, strict=True)] if calls else messages
                    rec.t_start = clock.now()
                    try:
                        res = await driver.turn(handle, messages, plan)
                    except Exception as exc:  # a failed turn is a data point, not the end of the run
                        res = TurnResult(error=f"{type(exc).__name__}: {exc}", finish_reason="error")
                    rec.t_end = clock.now()
                    rec.prompt_tokens, rec.cached_tokens = res.prompt_tokens, res.cached_tokens
                    rec.completion_tokens, rec.finish_reason = res.completion_tokens, res.finish_reason
                    rec.ttft_ms, rec.e2e_ms = res.ttft_ms, res.e2e_ms or (rec.t_end - rec.t_start) * 1000
                    rec.tool_calls, rec.error = len(res.tool_calls), res.error
                    rec.prompt_ids, rec.output_ids = res.prompt_ids, res.output_ids
                    records.append(rec)
                    if on_turn is not None:
                        on_turn(rec)
                    # A failed turn leaves the session as it was: continue with a user message.
                    calls = res.tool_calls if res.error is None else []
            finally:
                await driver.close(handle)

    await asyncio.gather(*(play(sp) for sp in workload.sessions))
    return records, clock.now()


# --------------------------------------------------------------------------- server


class ServerDriver:
    """A client of this runtime over a real WebSocket (protocol.client), one connection per session."""

    def __init__(self, url: str, workload: Workload, *, headers: dict[str, str] | None = None):
        self.url = url
        self.workload = workload
        self.headers = headers or {}

    async def open(self, sp: SessionPlan) -> dict[str, Any]:
        from protocol.client import connect

        agent = self.workload.agents[sp.agent]
        stack = contextlib.AsyncExitStack()
        client = await stack.enter_async_context(connect(self.url, headers=self.headers, open_timeout=60))
        try:
            session = await client.open_session(system_prompt=agent.system_prompt, tools=agent.tools)
        except BaseException:
            await stack.aclose()
            raise
        return {"client": client, "stack": stack, "session_id": session.session_id,
                "prefix_tokens": session.prefix_tokens}

    async def turn(self, h: dict[str, Any], messages: list[dict], plan: TurnPlan) -> TurnResult:
        from protocol.errors import RpcError

        started = time.perf_counter()
        gen = None
        try:
            gen = await h["client"].generate(
                session_id=h["session_id"], messages=messages, tool_choice=plan.tool_choice,
                parallel_tool_calls=plan.parallel_tool_calls, max_tokens=plan.max_tokens, temperature=0.0)
            result = await gen.result()
        except RpcError as exc:  # a failed turn (the server's error, or params refused locally)
            e2e = (time.perf_counter() - started) * 1000
            end = gen.stream_end if gen is not None else None
            return TurnResult(error=f"{exc.code}: {exc.message}", finish_reason="error", e2e_ms=e2e,
                              prompt_tokens=end.usage.prompt_tokens if end else 0,
                              completion_tokens=end.usage.completion_tokens if end else 0)
        e2e = (time.perf_counter() - started) * 1000  # measured here, over the socket
        return TurnResult(
            text=result.text,
            tool_calls=[c.model_dump(mode="json") for c in result.tool_calls],
            finish_reason=result.finish_reason,
            prompt_tokens=result.usage.prompt_tokens,
            cached_tokens=result.usage.cached_tokens,
            completion_tokens=result.usage.completion_tokens,
            # The server's own time to first token (it sees the engine's first token; a client
            # sees tool calls only when complete).
            ttft_ms=e2e if result.timings.ttft_ms is None else result.timings.ttft_ms,
            e2e_ms=e2e,
        )

    async def close(self, h: dict[str, Any]) -> None:
        from protocol.errors import RpcError

        try:
            with contextlib.suppress(RpcError):  # as before: a refused close does not stop the run
                await h["client"].close_session(h["session_id"])
        finally:
            await h["stack"].aclose()


# --------------------------------------------------------------------------- engine


def _params(session_id: str | None, messages: list[dict], plan: TurnPlan, **extra: Any) -> Any:
    """The generate params a client sends for this turn, validated as the server validates them."""
    from protocol.models import GenerateRequestParams

    return GenerateRequestParams.model_validate({
        "session_id": session_id, "messages": messages, "tool_choice": plan.tool_choice,
        "parallel_tool_calls": plan.parallel_tool_calls, "max_tokens": plan.max_tokens, "temperature": 0.0, **extra,
    })


def _result(out: Any, *, started: float) -> TurnResult:
    """A runtime.turn.TurnOutcome as the bench records it."""
    e2e = (time.perf_counter() - started) * 1000
    return TurnResult(
        text=out.text, tool_calls=list(out.tool_calls), finish_reason=out.finish_reason,
        prompt_tokens=out.prompt_tokens, cached_tokens=out.cached_tokens, completion_tokens=out.completion_tokens,
        ttft_ms=e2e if out.ttft_ms is None else out.ttft_ms, e2e_ms=e2e,
        prompt_ids=list(out.prompt_ids), output_ids=list(out.output_ids),
        error=None if out.error is None else f"{out.error.code}: {out.error.message}",
    )


async def _quiet(kind: str, payload: dict[str, Any]) -> None:
    return None  # the engine modes read the outcome, not the events


class EngineDriver:
    """This runtime without the socket: runtime.service.AgentRuntime's session.open and
    generate, called as the server calls them (same validation, sessions, turn and program).
    On an engine started with radix_cache=False it is the `no-radix` mode (session.open then
    skips the prefix warm-up, as the server does)."""

    OWNER = "bench"

    def __init__(self, runtime: Any, workload: Workload):
        self.runtime = runtime
        self.workload = workload

    async def open(self, sp: SessionPlan) -> dict[str, Any]:
        agent = self.workload.agents[sp.agent]
        opened = await self.runtime.open_session(system_prompt=agent.system_prompt, tools=agent.tools, owner=self.OWNER)
        return {"session_id": opened.session_id}

    async def turn(self, h: dict[str, Any], messages: list[dict], plan: TurnPlan) -> TurnResult:
        from protocol.errors import RpcError

        started = time.perf_counter()
        try:
            out = await self.runtime.generate(_params(h["session_id"], messages, plan), owner=self.OWNER, emit=_quiet,
                                              cancelled=asyncio.Event())
        except RpcError as exc:  # refused before the engine saw it
            return TurnResult(error=f"{exc.code}: {exc.message}", finish_reason="error",
                              e2e_ms=(time.perf_counter() - started) * 1000)
        return _result(out, started=started)

    async def close(self, h: dict[str, Any]) -> None:
        self.runtime.close_session(h["session_id"], owner=self.OWNER)


class RerenderDriver:
    """A stateless client: the whole history rendered to text and tokenized anew every turn,
    then run as one turn of the runtime (runtime.turn) on the radix-cache engine."""

    def __init__(self, runtime: Any, workload: Workload):
        self.runtime = runtime
        self.workload = workload
        self._tools = {g: runtime.check_tools(a.tools) for g, a in enumerate(workload.agents)}

    async def open(self, sp: SessionPlan) -> dict[str, Any]:
        agent = self.workload.agents[sp.agent]
        return {"system": agent.system_prompt, "tools": self._tools[sp.agent], "history": [], "calls": 0}

    async def turn(self, h: dict[str, Any], messages: list[dict], plan: TurnPlan) -> TurnResult:
        from runtime.backends import GenRequest
        from runtime.turn import run_token_turn

        started = time.perf_counter()
        rt = self.runtime
        history = h["history"] + [dict(m) for m in messages]
        # What an OpenAI-style server does with `messages`: render the conversation, tokenize it.
        text = "".join(rt.renderer.segments(h["system"], h["tools"], history))
        prompt = list(rt.renderer.tokenizer.encode(text, add_special_tokens=False))
        params = _params(None, history, plan, tools=h["tools"])
        program = rt.program(h["tools"], params)

        def call_id() -> str:
            h["calls"] += 1
            return f"call_{h['calls']}"

        request = GenRequest(rid=f"bench-{uuid.uuid4().hex}", input_ids=prompt, sampling=rt.sampling(params, program, len(prompt)))
        out = await run_token_turn(rt.backend, request, program, emit=_quiet, cancelled=asyncio.Event(),
                                   new_call_id=call_id, started=started)
        res = _result(out, started=started)
        if res.error is None:
            assistant: dict[str, Any] = {"role": "assistant", "content": res.text or None}
            if res.tool_calls:
                assistant["tool_calls"] = res.tool_calls
            h["history"] = history + [assistant]
        return res

    async def close(self, h: dict[str, Any]) -> None:
        return None


async def warm_grammars(runtime: Any, workload: Workload) -> None:
    """Compile every constraint the workload uses once, outside the measured runs, so no mode
    pays xgrammar's compilation (SGLang caches compiled grammars by constraint string)."""
    from runtime.backends import GenRequest, Sampling

    seen: set[str] = set()
    reqs = []
    hello = [{"role": "user", "content": "hi"}]
    for sp in workload.sessions:
        tools = runtime.check_tools(workload.agents[sp.agent].tools)
        for plan in sp.turns:
            c = runtime.program(tools, _params(None, hello, plan, tools=tools)).constraint()
            key = f"{sp.agent}:{c.value if c else None}"
            if key in seen or c is None:
                continue
            seen.add(key)
            reqs.append(GenRequest(rid=f"gwarm-{uuid.uuid4().hex}", input_ids=runtime.renderer.turn_ids(
                hello, close_previous=False), sampling=Sampling(max_new_tokens=1, constraint=c)))

    async def one(r: Any) -> None:
        async for _ in runtime.backend.stream(r):
            pass

    await asyncio.gather(*(one(r) for r in reqs))


async def jump_forward_counts(backend: Any) -> dict[str, int]:
    """The engine's counts of jump-forward in the middle of calls (an embedded CPU engine's
    scheduler), else {}."""
    counts = getattr(backend, "jump_forward_counts", None)
    return await counts() if counts is not None else {}


async def flush_cache(backend: Any) -> bool:
    """Empty the engine's radix cache so the next mode starts cold.

    SGLang refuses to flush while requests run, so this retries briefly."""
    for _ in range(50):
        if await backend.flush_cache():
            return True
        await asyncio.sleep(0.2)
    return False
