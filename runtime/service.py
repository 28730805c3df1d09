"""One agent turn, from validated params to streamed events and a result.

The request path below the socket: session lookup -> `programs` renders only the new turn's
tokens and builds the constraint -> the backend streams -> `programs` parses the stream into
text / reasoning / tool calls -> events go to the caller's `emit`. The server (runtime.app)
owns the wire; this module owns the meaning of a turn:

- A session turn sends `session.token_ids + turn_ids(new messages)`; on success the session
  becomes that prompt plus the output ids (append-only). A cancelled or failed turn leaves the
  session exactly as it was, so the client may simply retry it.
- Every tool call is validated against its tool's JSON Schema before it is emitted; an
  invalid one ends the turn with an error, never reaches the client as a call.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import programs
from protocol import errors as rpc
from runtime.backend import Backend, BackendError, BackendOverloaded, BackendUnavailable, GenRequest, Sampling
from runtime.config import Config
from runtime.metrics import METRICS
from runtime.sessions import SessionLimit, SessionNotFound, SessionStore

log = logging.getLogger("runtime.service")

Emit = Callable[[str, dict[str, Any]], Awaitable[None]]


@dataclass
class TurnOutcome:
    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str = "error"
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float | None = None  # None: no token was produced
    total_ms: float = 0.0
    error: rpc.RpcError | None = None
    session_id: str | None = None

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
        }

    def timings(self) -> dict[str, float]:
        ttft = None if self.ttft_ms is None else round(self.ttft_ms, 3)
        return {"ttft_ms": ttft, "total_ms": round(self.total_ms, 3)}

    def result(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "tool_calls": self.tool_calls,
            "finish_reason": self.finish_reason,
            "usage": self.usage(),
            "timings": self.timings(),
        }


class AgentRuntime:
    """Backend + sessions + the tool-call program: everything a connection calls into."""

    def __init__(self, cfg: Config, backend: Backend):
        self.cfg = cfg
        self.backend = backend
        self.sessions = SessionStore(
            max_sessions=cfg.max_sessions, max_per_owner=cfg.max_sessions_per_key, ttl_s=cfg.session_ttl_s
        )
        self._renderer: programs.Renderer | None = None
        self._fmt: programs.ToolFormat | None = None
        self._prefix_cache: dict[str, list[int]] = {}
        self.active = 0  # generate requests admitted to the backend (bounded by max_queue)

    # ------------------------------------------------------------------ helpers
    @property
    def fmt(self) -> programs.ToolFormat:
        if self._fmt is None:
            self._fmt = programs.format_for(self.backend.tokenizer, self.backend.info.extra.get("model_path"))
        return self._fmt

    @property
    def renderer(self) -> programs.Renderer:
        if self._renderer is None:
            self._renderer = programs.Renderer(self.backend.tokenizer, self.fmt)
        return self._renderer

    def _require_ready(self) -> None:
        if not self.backend.is_ready():
            raise rpc.EngineUnavailable("the engine is not ready (starting, restarting, or stopped); retry shortly")

    @staticmethod
    def _check_tools(tools: list[dict] | None) -> list[dict]:
        # `strict` is accepted for OpenAI compatibility and changes nothing (calls are always
        # constrained): dropped so it cannot split otherwise identical agent prefixes.
        tools = [{**t, "function": {k: v for k, v in t["function"].items() if k != "strict"}} for t in tools or []]
        try:
            return programs.check_tools(tools)
        except programs.ToolSchemaError as exc:
            if exc.keyword:
                raise rpc.UnsupportedToolSchema(exc.tool, exc.keyword, f"tool {exc.tool!r}: {exc.reason}") from None
            raise rpc.InvalidParams(
                f"Invalid params: tools: {exc.reason}", {"errors": [{"field": "tools", "message": f"{exc.tool}: {exc.reason}"}]}
            ) from None

    def _prefix_ids(self, system_prompt: str | None, tools: list[dict]) -> list[int]:
        # Agent definitions repeat across sessions: render each once.
        key = repr((system_prompt, tools))
        ids = self._prefix_cache.get(key)
        if ids is None:
            ids = self.renderer.prefix_ids(system_prompt, tools)
            if len(self._prefix_cache) > 256:
                self._prefix_cache.clear()
            self._prefix_cache[key] = ids
        return list(ids)

    # ------------------------------------------------------------------ sessions
    async def open_session(self, *, system_prompt: str | None, tools: list[dict] | None, owner: str) -> dict[str, Any]:
        self._require_ready()
        canonical = self._check_tools(tools)
        if not getattr(self.backend, "token_level", True):
            return self._open_chat_session(system_prompt, canonical, owner)
        prefix = self._prefix_ids(system_prompt, canonical)
        limit = self.backend.info.context_length
        if len(prefix) >= limit:
            raise rpc.ContextLengthExceeded(len(prefix), limit, "the system prompt and tools alone exceed the context length")
        try:
            session = self.sessions.open(owner=owner, system_prompt=system_prompt, tools=canonical, prefix_ids=prefix)
        except SessionLimit as exc:
            raise rpc.Overloaded(5000, str(exc)) from None
        METRICS.sessions_open.set(len(self.sessions))
        await self._warm(prefix)
        return {"session_id": session.id, "prefix_tokens": session.prefix_tokens}

    async def _warm(self, prefix: list[int]) -> None:
        """Compute the prefix once so the first turn (and other sessions) find it cached."""
        req = GenRequest(rid=f"warm-{uuid.uuid4().hex}", input_ids=prefix, sampling=Sampling(max_new_tokens=1))
        try:
            async for _ in self.backend.stream(req):
                pass
        except BackendError as exc:  # warming is an optimisation; the turn itself reports errors
            log.warning("prefix warm-up failed: %s", exc)

    def close_session(self, session_id: str, *, owner: str) -> dict[str, Any]:
        try:
            session = self.sessions.close(session_id, owner=owner)
        except SessionNotFound:
            raise rpc.SessionNotFound(session_id) from None
        if session.running is not None:  # its running turn ends with stream_end 'cancelled'
            session.running.set()
        METRICS.sessions_open.set(len(self.sessions))
        return {"closed": True}

    # ------------------------------------------------------------------ generate
    async def generate(
        self,
        params: Any,
        *,
        owner: str,
        emit: Emit,
        cancelled: asyncio.Event,
        rid: str | None = None,
    ) -> TurnOutcome:
        """Run one turn. Raises rpc.RpcError for requests refused before the engine saw them;
        once generation started, failures come back as an outcome with finish_reason 'error'."""
        self._require_ready()
        started = time.perf_counter()
        p = params
        session = None
        if p.session_id is not None:
            if p.system_prompt is not None or p.tools is not None:
                raise rpc.InvalidParams(
                    "Invalid params: system_prompt and tools come from the session when session_id is given",
                    {"errors": [{"field": "system_prompt" if p.system_prompt is not None else "tools",
                                 "message": "not allowed with session_id (set them in session.open)"}]},
                )
            try:
                session = self.sessions.get(p.session_id, owner=owner)
            except SessionNotFound:
                raise rpc.SessionNotFound(p.session_id) from None
        tools = session.tools if session else self._check_tools(_dump_list(p.tools))
        if not getattr(self.backend, "token_level", True):
            return await self._generate_chat(p, session, tools, emit=emit, cancelled=cancelled, started=started, rid=rid)
        program = self._program(tools, p)
        messages = [_dump(m) for m in p.messages]

        if session is None:
            system = p.system_prompt
            if system is None and messages and messages[0]["role"] == "system":
                system, messages = messages[0].get("content") or "", messages[1:]
            return await self._run(None, _rendered(self.renderer.full_ids, system, tools, messages), program, p,
                                   tools=tools, emit=emit, cancelled=cancelled, started=started, rid=rid)
        _check_not_busy(session)
        async with session.lock:
            self._check_turn_messages(session, messages)
            new_ids = _rendered(self.renderer.turn_ids, messages, close_previous=session.open_turn)
            prompt = session.token_ids + new_ids
            session.running = cancelled
            try:
                outcome = await self._run(session, prompt, program, p, tools=tools, emit=emit,
                                          cancelled=cancelled, started=started, rid=rid)
            finally:
                session.running = None
            outcome.session_id = session.id
            return outcome

    def _program(self, tools: list[dict], p: Any) -> programs.ToolProgram:
        choice = p.tool_choice if isinstance(p.tool_choice, str) or p.tool_choice is None else _dump(p.tool_choice)
        choice = choice or "auto"
        names = {t["function"]["name"] for t in tools}
        if isinstance(choice, dict):
            name = choice.get("function", {}).get("name")
            if name not in names:
                raise rpc.InvalidParams(
                    f"Invalid params: tool_choice names {name!r}, which is not among the tools",
                    {"errors": [{"field": "tool_choice.function.name", "message": f"unknown tool {name!r}; tools: {sorted(names)}"}]},
                )
        elif choice == "required" and not tools:
            raise rpc.InvalidParams(
                "Invalid params: tool_choice 'required' needs at least one tool",
                {"errors": [{"field": "tool_choice", "message": "'required' with no tools"}]},
            )
        parallel = True if p.parallel_tool_calls is None else bool(p.parallel_tool_calls)
        return programs.ToolProgram(self.fmt, tools, tool_choice=choice, parallel_tool_calls=parallel,
                                    end_of_turn=self.renderer.end_of_turn)

    def _check_max_tokens(self, p: Any) -> None:
        if p.max_tokens is not None and p.max_tokens > self.cfg.max_tokens_cap:
            raise rpc.InvalidParams(
                f"Invalid params: max_tokens: {p.max_tokens} exceeds this server's cap of {self.cfg.max_tokens_cap}",
                {"errors": [{"field": "max_tokens", "message": f"at most {self.cfg.max_tokens_cap} (server.info limits.max_tokens_cap)"}]},
            )

    @staticmethod
    def _check_turn_messages(session: Any, messages: list[dict]) -> None:
        if not messages:
            raise rpc.InvalidParams("Invalid params: messages: a turn needs at least one new message",
                                    {"errors": [{"field": "messages", "message": "empty"}]})
        for i, m in enumerate(messages):
            role = m.get("role")
            if role not in ("user", "tool"):
                raise rpc.InvalidParams(
                    f"Invalid params: messages.{i}.role: {role!r} cannot be appended to a session "
                    "(a session turn sends user text or tool results; the system prompt is fixed at session.open)",
                    {"errors": [{"field": f"messages.{i}.role", "message": "only 'user' or 'tool' in a session turn"}]},
                )
            if role == "tool" and m.get("tool_call_id") not in session.pending_calls:
                raise rpc.InvalidParams(
                    f"Invalid params: messages.{i}.tool_call_id does not answer a call of the last turn",
                    {"errors": [{"field": f"messages.{i}.tool_call_id",
                                 "message": f"unknown call id; open calls: {sorted(session.pending_calls)}"}]},
                )
            if role == "tool" and "name" not in m:
                m["name"] = session.pending_calls[m["tool_call_id"]]

    def _sampling(self, p: Any, program: programs.ToolProgram, prompt_tokens: int) -> Sampling:
        limit = self.backend.info.context_length
        if prompt_tokens >= limit:
            raise rpc.ContextLengthExceeded(prompt_tokens, limit)
        self._check_max_tokens(p)
        # Room left in the context bounds the completion: it ends with 'length' there.
        max_tokens = min(p.max_tokens or self.cfg.default_max_tokens, limit - prompt_tokens)
        return Sampling(
            max_new_tokens=max_tokens,
            temperature=0.0 if p.temperature is None else float(p.temperature),
            top_p=1.0 if p.top_p is None else float(p.top_p),
            stop=tuple(p.stop or ()),
            seed=p.seed,
            constraint=program.constraint(),
        )

    async def _run(self, session, prompt, program, p, *, tools, emit, cancelled, started, rid) -> TurnOutcome:
        sampling = self._sampling(p, program, len(prompt))
        # Admission is counted here, synchronously, not by the backend: requests arriving in
        # the same instant must not all see an empty queue.
        if self.active >= self.cfg.max_queue:
            raise rpc.Overloaded(retry_after_ms=1000, message=f"the engine queue is full ({self.cfg.max_queue} requests); retry later")
        self.active += 1
        try:
            return await self._generate_admitted(session, prompt, program, sampling, tools=tools, emit=emit,
                                                 cancelled=cancelled, started=started, rid=rid)
        finally:
            self.active -= 1

    async def _generate_admitted(self, session, prompt, program, sampling, *, tools, emit, cancelled, started, rid) -> TurnOutcome:
        request = GenRequest(rid=rid or uuid.uuid4().hex, input_ids=prompt, sampling=sampling)
        out = TurnOutcome(prompt_tokens=len(prompt))
        parser = program.parser()
        by_name = {t["function"]["name"]: t for t in tools}
        state: dict[str, Any] = {"text": "", "ids": [], "finish": None, "first": None}
        pending: dict[str, str] = {}

        async def handle(events: list[Any]) -> None:
            for ev in events:
                if isinstance(ev, programs.TextDelta):
                    if ev.text:
                        out.text += ev.text
                        await emit("text_chunk", {"text": ev.text})
                elif isinstance(ev, programs.ReasoningDelta):
                    if ev.text:
                        await emit("reasoning_chunk", {"text": ev.text})
                elif isinstance(ev, programs.ToolCallEvent):
                    await _emit_call(ev.name, ev.arguments, by_name, session, out, pending, emit)
                elif isinstance(ev, programs.InvalidOutput):
                    if state["finish"] == "length":
                        continue  # a call cut off by max_tokens: the turn ends with 'length', no call
                    raise _BadOutput(ev.reason)

        async def pump() -> None:
            async for u in self.backend.stream(request):
                if state["first"] is None and (u.completion_tokens or u.output_ids):
                    state["first"] = time.perf_counter()
                delta = u.text[len(state["text"]):] if u.text.startswith(state["text"]) else u.text
                state["text"], state["ids"] = u.text, u.output_ids
                out.cached_tokens, out.completion_tokens = u.cached_tokens, u.completion_tokens
                if delta:
                    await handle(parser.feed(delta))
                if u.finish_reason is not None:
                    state["finish"] = u.finish_reason
            await handle(parser.finish())

        await _drive(pump, out, cancelled, lambda: state["finish"])
        now = time.perf_counter()
        out.ttft_ms = None if state["first"] is None else (state["first"] - started) * 1000
        out.total_ms = (now - started) * 1000
        if out.finish_reason == "error" and out.error is None and state["finish"] == "abort":
            out.error = rpc.InternalError("the engine aborted the request")
        # A finished or cancelled turn is kept (a cancelled one up to where it stopped, its turn
        # left open); a failed turn leaves the session as it was, so the client may retry it.
        if session is not None and out.finish_reason in ("stop", "length", "tool_calls", "cancelled"):
            ids = list(state["ids"])
            session.token_ids = list(prompt) + ids
            session.open_turn = not (ids and ids[-1] in self.renderer.stop_token_ids)
            session.pending_calls = pending
            session.turns += 1
        METRICS.observe_turn(out)
        return out

    # ------------------------------------------------------------------ chat-level backends
    # A backend without token ids (INFERENCE_BACKEND=openai, runtime.remote.OpenAIBackend)
    # gets messages: a session keeps its history as OpenAI chat messages and each turn sends
    # all of it; the server's chat template renders it and its tool parser finds the calls.
    # Same contract as the token path: one TurnOutcome, events through `emit`, every call
    # validated against its tool's schema before it is emitted.

    def _open_chat_session(self, system_prompt: str | None, tools: list[dict], owner: str) -> dict[str, Any]:
        try:
            session = self.sessions.open(owner=owner, system_prompt=system_prompt, tools=tools, prefix_ids=[])
        except SessionLimit as exc:
            raise rpc.Overloaded(5000, str(exc)) from None
        session.messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        METRICS.sessions_open.set(len(self.sessions))
        return {"session_id": session.id, "prefix_tokens": 0}  # tokens are the server's business

    async def _generate_chat(self, p: Any, session: Any, tools: list[dict], *, emit, cancelled, started, rid) -> TurnOutcome:
        from runtime.remote import chat_messages

        try:
            programs.normalize_tool_choice(_dump(p.tool_choice) if p.tool_choice is not None and not isinstance(p.tool_choice, str)
                                           else p.tool_choice, [t["function"]["name"] for t in tools])
        except ValueError as exc:
            raise rpc.InvalidParams(f"Invalid params: tool_choice: {exc}", {"errors": [{"field": "tool_choice", "message": str(exc)}]}) from None
        messages = [_dump(m) for m in p.messages]
        if session is None:
            system = [{"role": "system", "content": p.system_prompt}] if p.system_prompt is not None else []
            return await self._chat_turn(None, system + chat_messages(messages), p, tools, emit=emit, cancelled=cancelled,
                                         started=started, rid=rid)
        _check_not_busy(session)
        async with session.lock:
            self._check_turn_messages(session, messages)
            session.running = cancelled
            try:
                out = await self._chat_turn(session, session.messages + chat_messages(messages), p, tools, emit=emit,
                                            cancelled=cancelled, started=started, rid=rid)
            finally:
                session.running = None
            out.session_id = session.id
            return out

    async def _chat_turn(self, session, history, p, tools, *, emit, cancelled, started, rid) -> TurnOutcome:
        import json

        from runtime.remote import BackendContextLength, ChatRequest, chat_tools

        self._check_max_tokens(p)
        if self.active >= self.cfg.max_queue:
            raise rpc.Overloaded(retry_after_ms=1000, message=f"the engine queue is full ({self.cfg.max_queue} requests); retry later")
        choice = p.tool_choice if p.tool_choice is None or isinstance(p.tool_choice, str) else _dump(p.tool_choice)
        parallel = True if p.parallel_tool_calls is None else bool(p.parallel_tool_calls)
        request = ChatRequest(
            rid=rid or uuid.uuid4().hex, messages=history, max_tokens=p.max_tokens or self.cfg.default_max_tokens,
            tools=chat_tools(tools), tool_choice=choice or "auto", parallel_tool_calls=parallel,
            temperature=0.0 if p.temperature is None else float(p.temperature),
            top_p=1.0 if p.top_p is None else float(p.top_p), stop=tuple(p.stop or ()), seed=p.seed,
        )
        out = TurnOutcome()
        by_name = {t["function"]["name"]: t for t in tools}
        state: dict[str, Any] = {"finish": None, "first": None}
        pending: dict[str, str] = {}

        async def pump() -> None:
            async for u in self.backend.chat(request):
                if state["first"] is None and (u.text or u.reasoning or u.tool_calls):
                    state["first"] = time.perf_counter()
                if u.reasoning:
                    await emit("reasoning_chunk", {"text": u.reasoning})
                if u.text:
                    out.text += u.text
                    await emit("text_chunk", {"text": u.text})
                for c in u.tool_calls:
                    if out.tool_calls and not parallel:
                        break  # the server ignored parallel_tool_calls=false: the first call stands
                    try:
                        arguments = json.loads(c.arguments or "{}")
                    except ValueError:
                        arguments, problems = None, [f"arguments are not JSON: {c.arguments[:200]!r}"]
                    else:
                        tool = by_name.get(c.name)
                        problems = ["unknown tool"] if tool is None else programs.validate_arguments(tool, arguments)
                    if problems and u.finish_reason == "length":
                        log.info("dropping a tool call cut short by max_tokens: %s", "; ".join(problems[:3]))
                        continue  # not a complete call; the turn ends with 'length'
                    if problems:
                        METRICS.invalid_calls.inc()
                        raise _BadOutput(f"the model produced an invalid call of {c.name!r}: {'; '.join(problems[:3])}")
                    await _emit_call(c.name, arguments, by_name, session, out, pending, emit)
                if u.prompt_tokens is not None:
                    out.prompt_tokens, out.cached_tokens = int(u.prompt_tokens), int(u.cached_tokens)
                if u.completion_tokens is not None:
                    out.completion_tokens = int(u.completion_tokens)
                if u.finish_reason is not None:
                    state["finish"] = "length" if u.finish_reason == "length" else "stop"

        self.active += 1
        try:
            await _drive(pump, out, cancelled, lambda: state["finish"])
        finally:
            self.active -= 1
        now = time.perf_counter()
        out.ttft_ms = None if state["first"] is None else (state["first"] - started) * 1000
        out.total_ms = (now - started) * 1000
        if session is not None and out.finish_reason in ("stop", "length", "tool_calls", "cancelled"):
            from runtime.remote import chat_messages

            reply = {"role": "assistant", "content": out.text or None, "tool_calls": out.tool_calls}
            session.messages = history + chat_messages([reply])
            session.pending_calls = pending
            session.turns += 1
        METRICS.observe_turn(out)
        return out


class _BadOutput(Exception):
    pass


async def _emit_call(name: str, arguments: Any, by_name: dict[str, dict], session: Any, out: TurnOutcome,
                     pending: dict[str, str], emit: Emit) -> None:
    """Validate one complete call against its tool's schema, give it an id, send it."""
    tool = by_name.get(name)
    problems = ["unknown tool"] if tool is None else programs.validate_arguments(tool, arguments)
    if problems:
        METRICS.invalid_calls.inc()
        raise _BadOutput(f"the model produced an invalid call of {name!r}: {'; '.join(problems[:3])}")
    call_id = session.next_call_id() if session else f"call_{uuid.uuid4().hex[:16]}"
    call = {"call_id": call_id, "name": name, "arguments": arguments}
    out.tool_calls.append(call)
    pending[call_id] = name
    await emit("function_call_request", call)


async def _drive(pump: Callable[[], Awaitable[None]], out: TurnOutcome, cancelled: asyncio.Event,
                 engine_finish: Callable[[], str | None]) -> None:
    """Run `pump` until it ends or `cancelled` is set; record finish_reason and error in `out`.

    Failures after generation started become an outcome (the caller still sends stream_end
    and a response); only a cancellation of the caller itself propagates.
    """
    from runtime.remote import BackendContextLength

    task = asyncio.create_task(pump())
    waiter = asyncio.create_task(cancelled.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():  # cancel requested while generating: stopping the stream aborts it
            task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            if not cancelled.is_set():
                raise
            out.finish_reason = "cancelled"
        else:
            out.finish_reason = _finish(engine_finish(), out.tool_calls, cancelled.is_set())
    except _BadOutput as exc:
        out.finish_reason, out.error = "error", rpc.InternalError(str(exc), {"reason": "invalid_model_output"})
    except BackendContextLength as exc:
        out.finish_reason, out.error = "error", rpc.ContextLengthExceeded(exc.prompt_tokens, exc.limit, str(exc))
    except BackendOverloaded as exc:
        out.finish_reason, out.error = "error", rpc.Overloaded(exc.retry_after_ms, str(exc))
    except BackendUnavailable as exc:
        out.finish_reason, out.error = "error", rpc.EngineUnavailable(f"the engine became unavailable: {exc}")
    except BackendError as exc:
        out.finish_reason, out.error = "error", rpc.InternalError(f"generation failed: {exc}")
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()


def _check_not_busy(session: Any) -> None:
    # Turn N+1's prompt is turn N's output: a second concurrent turn on a session cannot be meant.
    if session.lock.locked():
        raise rpc.InvalidParams(
            "Invalid params: session_id: the session is running a turn; wait for its stream_end",
            {"errors": [{"field": "session_id", "message": "busy: one turn at a time per session"}]},
        )


def _rendered(render: Callable[..., list[int]], *args: Any, **kwargs: Any) -> list[int]:
    """Render, with a history the template cannot express reported as the client's error."""
    try:
        return render(*args, **kwargs)
    except ValueError as exc:  # programs.RenderError included
        raise rpc.InvalidParams(f"Invalid params: messages: {exc}", {"errors": [{"field": "messages", "message": str(exc)}]}) from None


def _finish(engine_reason: str | None, calls: list, cancelled: bool) -> str:
    if engine_reason == "abort":
        return "cancelled" if cancelled else "error"
    if calls:
        return "tool_calls"
    return "length" if engine_reason == "length" else "stop"


def _dump(model: Any) -> dict[str, Any]:
    if hasattr(model, "model_dump"):
        return model.model_dump(exclude_none=True)
    return dict(model)


def _dump_list(items: Any) -> list[dict] | None:
    return None if items is None else [_dump(i) for i in items]
