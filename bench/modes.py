"""The benchmark's modes: one session loop, a driver per way of serving a turn.

Every mode runs the same `Workload` through `run_sessions`: C sessions in flight, each opening
(session.open or its equivalent) and then playing its T turns one after the other. A turn's
input is the tool results for the calls of the previous model turn when it made any (content
from the workload, keyed by session/turn/tool name), else the session's next user message.

Drivers (what differs between modes):
- ServerDriver   this runtime over a real WebSocket: session.open, generate with session_id
                 (only the new messages), notifications, stream_end usage and timings.
- EngineDriver   the same turn on the embedded engine directly, token ids built exactly as
                 runtime.service builds them for a session (prefix_ids, warm-up at open,
                 turn_ids(close_previous=...), prompt + output ids appended), the same
                 programs.ToolProgram constraint and parser: what is left is the protocol layer.
                 With `warm=False` and an engine started with radix_cache=False it is `no-radix`.
- RerenderDriver a naive stateless client: it keeps the message history, and each turn the
                 whole history is rendered to one text and tokenized again (what an
                 OpenAI-style server does with `messages`), on the radix-cache engine.
The `hf` mode (bench.hf) replays another mode's token ids with transformers generate.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

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
    """A client of this runtime over a real WebSocket, one connection per session."""

    def __init__(self, url: str, workload: Workload, *, headers: dict[str, str] | None = None):
        self.url = url
        self.workload = workload
        self.headers = headers or {}
        self._ids = 0

    async def _call(self, ws: Any, method: str, params: dict[str, Any], *, first_event: list | None = None) -> tuple[dict, list]:
        self._ids += 1
        rid = self._ids
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params}))
        notes = []
        while True:
            frame = json.loads(await ws.recv())
            if isinstance(frame, dict) and "method" in frame:
                if first_event is not None and not first_event:
                    first_event.append(time.perf_counter())
                notes.append(frame)
                continue
            if isinstance(frame, dict) and frame.get("id") == rid:
                return frame, notes
            raise RuntimeError(f"unexpected frame: {str(frame)[:200]}")

    async def open(self, sp: SessionPlan) -> dict[str, Any]:
        import websockets

        agent = self.workload.agents[sp.agent]
        ws = await websockets.connect(self.url, max_size=None, additional_headers=self.headers, open_timeout=60,
                                      ping_interval=None)
        reply, _ = await self._call(ws, "session.open", {"system_prompt": agent.system_prompt, "tools": agent.tools})
        if "error" in reply:
            await ws.close()
            raise RuntimeError(f"session.open failed: {reply['error']}")
        return {"ws": ws, "session_id": reply["result"]["session_id"], "prefix_tokens": reply["result"]["prefix_tokens"]}

    async def turn(self, h: dict[str, Any], messages: list[dict], plan: TurnPlan) -> TurnResult:
        params = {
            "session_id": h["session_id"],
            "messages": messages,
            "tool_choice": plan.tool_choice,
            "parallel_tool_calls": plan.parallel_tool_calls,
            "max_tokens": plan.max_tokens,
            "temperature": 0.0,
        }
        first: list[float] = []
        started = time.perf_counter()
        reply, notes = await self._call(h["ws"], "generate", params, first_event=first)
        e2e = (time.perf_counter() - started) * 1000
        end = next((n["params"] for n in notes if n.get("method") == "stream_end"), None)
        if "error" in reply:
            usage = (end or {}).get("usage", {})
            return TurnResult(error=f"{reply['error'].get('code')}: {reply['error'].get('message')}",
                              finish_reason="error", e2e_ms=e2e, prompt_tokens=usage.get("prompt_tokens", 0),
                              completion_tokens=usage.get("completion_tokens", 0))
        result = reply["result"]
        usage, timings = result["usage"], result["timings"]
        return TurnResult(
            text=result.get("text") or "",
            tool_calls=result.get("tool_calls") or [],
            finish_reason=result.get("finish_reason", ""),
            prompt_tokens=usage["prompt_tokens"],
            cached_tokens=usage["cached_tokens"],
            completion_tokens=usage["completion_tokens"],
            # The server's own time to first token (it sees the engine's first token; a client
            # sees tool calls only when complete). e2e is measured here, over the socket.
            ttft_ms=e2e if timings.get("ttft_ms") is None else float(timings["ttft_ms"]),
            e2e_ms=e2e,
        )

    async def close(self, h: dict[str, Any]) -> None:
        try:
            await self._call(h["ws"], "session.close", {"session_id": h["session_id"]})
        finally:
            await h["ws"].close()


# --------------------------------------------------------------------------- engine


class _Programs:
    """The programs/ objects a driver needs, built once per tokenizer (as runtime.service does)."""

    def __init__(self, tokenizer: Any, model_path: str | None):
        import programs

        self.p = programs
        self.tokenizer = tokenizer
        self.fmt = programs.format_for(tokenizer, model_path)
        self.renderer = programs.Renderer(tokenizer, self.fmt)
        self.end_ids = set(self.renderer.stop_token_ids)  # an output ending in one closes the turn

    def tools(self, tools: list[dict]) -> list[dict]:
        return self.p.check_tools(tools)

    def program(self, tools: list[dict], plan: TurnPlan) -> Any:
        return self.p.ToolProgram(self.fmt, tools, tool_choice=plan.tool_choice,
                                  parallel_tool_calls=plan.parallel_tool_calls, end_of_turn=self.renderer.end_of_turn)


async def stream_turn(backend: Any, progs: _Programs, prompt: list[int], program: Any, tools: list[dict],
                      max_tokens: int, *, started: float, make_call_id: Callable[[], str]) -> TurnResult:
    """One generation on the backend with the program's constraint and parser, as
    runtime.service runs a turn: same sampling, same parse, same argument validation, a call
    cut off by max_tokens ends the turn with 'length' and no call."""
    from runtime.backend import GenRequest, Sampling

    limit = backend.info.context_length
    if len(prompt) >= limit:
        return TurnResult(error=f"context length exceeded: {len(prompt)} >= {limit}", finish_reason="error",
                          prompt_tokens=len(prompt))
    sampling = Sampling(max_new_tokens=min(max_tokens, limit - len(prompt)), temperature=0.0, top_p=1.0,
                        constraint=program.constraint())
    p = progs.p
    parser = program.parser()
    by_name = {t["function"]["name"]: t for t in tools}
    res = TurnResult(prompt_tokens=len(prompt), prompt_ids=list(prompt))
    state: dict[str, Any] = {"text": "", "first": None, "finish": None, "ids": []}

    def handle(events: list[Any]) -> None:
        for ev in events:
            if isinstance(ev, p.TextDelta):
                res.text += ev.text
            elif isinstance(ev, p.ToolCallEvent):
                tool = by_name.get(ev.name)
                problems = ["unknown tool"] if tool is None else p.validate_arguments(tool, ev.arguments)
                if problems:
                    raise ValueError(f"invalid call of {ev.name!r}: {'; '.join(problems[:3])}")
                res.tool_calls.append({"call_id": make_call_id(), "name": ev.name, "arguments": ev.arguments})
            elif isinstance(ev, p.InvalidOutput):
                if state["finish"] == "length":
                    continue  # a call cut off by max_tokens
                raise ValueError(ev.reason)

    request = GenRequest(rid=f"bench-{uuid.uuid4().hex}", input_ids=prompt, sampling=sampling)
    try:
        async for u in backend.stream(request):
            if state["first"] is None and (u.completion_tokens or u.output_ids):
                state["first"] = time.perf_counter()
            delta = u.text[len(state["text"]):] if u.text.startswith(state["text"]) else u.text
            state["text"], state["ids"] = u.text, u.output_ids
            res.cached_tokens, res.completion_tokens = u.cached_tokens, u.completion_tokens
            if delta:
                handle(parser.feed(delta))
            if u.finish_reason is not None:
                state["finish"] = u.finish_reason
        handle(parser.finish())
    except ValueError as exc:
        res.error, res.finish_reason = f"invalid model output: {exc}", "error"
    now = time.perf_counter()
    res.ttft_ms = ((state["first"] or now) - started) * 1000
    res.e2e_ms = (now - started) * 1000
    res.output_ids = list(state["ids"])
    if res.error is None:
        if state["finish"] == "abort":
            res.error, res.finish_reason = "the engine aborted the request", "error"
        else:
            res.finish_reason = "tool_calls" if res.tool_calls else ("length" if state["finish"] == "length" else "stop")
    return res


class EngineDriver:
    """Sessions held here as token ids, exactly as runtime.service holds them, on the engine."""

    def __init__(self, backend: Any, workload: Workload, progs: _Programs, *, warm: bool):
        self.backend = backend
        self.workload = workload
        self.progs = progs
        self.warm = warm
        self._tools = {g: progs.tools(a.tools) for g, a in enumerate(workload.agents)}
        self._prefix = {g: progs.renderer.prefix_ids(a.system_prompt, self._tools[g]) for g, a in enumerate(workload.agents)}

    async def open(self, sp: SessionPlan) -> dict[str, Any]:
        from runtime.backend import GenRequest, Sampling

        prefix = list(self._prefix[sp.agent])
        if self.warm:  # session.open computes the prefix once (runtime.service.AgentRuntime._warm)
            req = GenRequest(rid=f"warm-{uuid.uuid4().hex}", input_ids=prefix, sampling=Sampling(max_new_tokens=1))
            async for _ in self.backend.stream(req):
                pass
        return {"ids": prefix, "open_turn": False, "pending": {}, "calls": 0, "sid": f"sess_{sp.index:03d}",
                "tools": self._tools[sp.agent]}

    async def turn(self, h: dict[str, Any], messages: list[dict], plan: TurnPlan) -> TurnResult:
        started = time.perf_counter()
        msgs = [dict(m, name=h["pending"][m["tool_call_id"]]) if m["role"] == "tool" else m for m in messages]
        prompt = h["ids"] + self.progs.renderer.turn_ids(msgs, close_previous=h["open_turn"])
        program = self.progs.program(h["tools"], plan)

        def call_id() -> str:
            h["calls"] += 1
            return f"call_{h['sid'][:8]}_{h['calls']}"

        res = await stream_turn(self.backend, self.progs, prompt, program, h["tools"], plan.max_tokens,
                                started=started, make_call_id=call_id)
        if res.error is None:
            out = res.output_ids or []
            h["ids"] = list(prompt) + list(out)
            h["open_turn"] = not (out and out[-1] in self.progs.end_ids)
            h["pending"] = {c["call_id"]: c["name"] for c in res.tool_calls}
        return res

    async def close(self, h: dict[str, Any]) -> None:
        return None


class RerenderDriver:
    """A stateless client: the whole history rendered to text and tokenized anew every turn."""

    def __init__(self, backend: Any, workload: Workload, progs: _Programs):
        self.backend = backend
        self.workload = workload
        self.progs = progs
        self._tools = {g: progs.tools(a.tools) for g, a in enumerate(workload.agents)}

    async def open(self, sp: SessionPlan) -> dict[str, Any]:
        agent = self.workload.agents[sp.agent]
        return {"system": agent.system_prompt, "tools": self._tools[sp.agent], "history": [], "calls": 0}

    async def turn(self, h: dict[str, Any], messages: list[dict], plan: TurnPlan) -> TurnResult:
        started = time.perf_counter()
        history = h["history"] + [dict(m) for m in messages]
        # What an OpenAI-style server does with `messages`: render the conversation, tokenize it.
        text = "".join(self.progs.renderer.segments(h["system"], h["tools"], history))
        prompt = list(self.progs.tokenizer.encode(text, add_special_tokens=False))
        program = self.progs.program(h["tools"], plan)

        def call_id() -> str:
            h["calls"] += 1
            return f"call_{h['calls']}"

        res = await stream_turn(self.backend, self.progs, prompt, program, h["tools"], plan.max_tokens,
                                started=started, make_call_id=call_id)
        if res.error is None:
            assistant: dict[str, Any] = {"role": "assistant", "content": res.text or None}
            if res.tool_calls:
                assistant["tool_calls"] = res.tool_calls
            h["history"] = history + [assistant]
        return res

    async def close(self, h: dict[str, Any]) -> None:
        return None


async def warm_grammars(backend: Any, workload: Workload, progs: _Programs) -> None:
    """Compile every constraint the workload uses once, outside the measured runs, so no mode
    pays xgrammar's compilation (SGLang caches compiled grammars by constraint string)."""
    from runtime.backend import GenRequest, Sampling

    seen: set[str] = set()
    reqs = []
    for sp in workload.sessions:
        tools = progs.tools(workload.agents[sp.agent].tools)
        for plan in sp.turns:
            c = progs.program(tools, plan).constraint()
            key = f"{sp.agent}:{c.value if c else None}"
            if key in seen or c is None:
                continue
            seen.add(key)
            reqs.append(GenRequest(rid=f"gwarm-{uuid.uuid4().hex}", input_ids=progs.renderer.turn_ids(
                [{"role": "user", "content": "hi"}], close_previous=False), sampling=Sampling(max_new_tokens=1, constraint=c)))

    async def one(r: Any) -> None:
        async for _ in backend.stream(r):
            pass

    await asyncio.gather(*(one(r) for r in reqs))


async def flush_cache(backend: Any) -> bool:
    """Empty the engine's radix cache so the next mode starts cold.

    Uses backend.flush_cache() when the backend has one; else SGLang's tokenizer manager.
    SGLang refuses to flush while requests run, so this retries briefly."""
    fn = getattr(backend, "flush_cache", None)
    for _ in range(50):
        if fn is not None:
            ok = await fn()
        else:
            out = await backend._engine.tokenizer_manager.flush_cache()
            ok = bool(getattr(out, "success", out))
        if ok:
            return True
        await asyncio.sleep(0.2)
    return False
