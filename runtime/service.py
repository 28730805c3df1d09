"""The runtime's calls, below every front end: sessions, admission, and which turn runs.

A front end (the WebSocket server in runtime.app; the benchmark's engine mode, which is the
server without the socket) validates its wire once (protocol), then calls AgentRuntime. This
module checks only what depends on state (sessions, the tool set a session holds, the engine's
context and queue), builds the turn's prompt and runs the one turn of its backend kind:

    token backend   runtime.turn.run_token_turn: a session turn sends
                    `session.token_ids + turn_ids(new messages)`; a stateless one renders the
                    whole history once. On success the session becomes that prompt plus the
                    output ids (append-only).
    chat backend    runtime.chat_turn.run_chat_turn: the session's messages plus the new ones.

A cancelled turn is kept up to where it stopped; a failed turn leaves the session exactly as
it was, so the client may simply retry it.

What a client sends is bounded before it costs: protocol refuses too many messages, too many or
too long stop strings and lone surrogates; here, a tool set is measured (max_tools_bytes) before
its schemas are checked, a prompt's characters are compared with the context before it is
rendered, and checking, rendering and tokenizing run in worker threads, never on the event
loop. Rendered agent prefixes are cached only when they fit, in a PrefixCache bounded in
tokens. A session.open warm-up is admitted and counted like a turn (max_queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

import programs
from protocol import errors as rpc
from protocol.models import GenerateRequestParams, SessionCloseResult, SessionOpenResult, check_tool_choice
from runtime.backends.base import (
    Backend,
    BackendInfo,
    BackendUnavailable,
    ChatBackend,
    ChatRequest,
    GenRequest,
    Sampling,
    TokenBackend,
)
from runtime.chat_turn import chat_messages, chat_tools, run_chat_turn
from runtime.config import Config
from runtime.continuations import ContinuationStore, open_turn, stateless_prompt
from runtime.metrics import METRICS
from runtime.prompts import PrefixCache, check_tools, checked_response_format, content_chars, longest_token, rendered, sized_tools
from runtime.sessions import Session, SessionLimit, SessionNotFound, SessionStore
from runtime.turn import KEPT, Emit, TurnOutcome, random_call_id, run_token_turn
from runtime.warmup import MIN_SHARED_WARM_TOKENS, SharedWarmups, warm_prefix

log = logging.getLogger("runtime.service")



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
        self._prefix_cache = PrefixCache()
        self._token_chars: int | None = None  # the most characters one token can stand for
        self.active = 0  # generate requests admitted to the backend (bounded by max_queue)
        self.continuations = ContinuationStore(max_bytes=cfg.continuation_bytes, ttl_s=cfg.continuation_ttl_s)
        self.warmups = SharedWarmups()  # agent prefixes warmed, one at a time each (runtime.warmup)

    # ------------------------------------------------------------------ the program
    def _token_backend(self) -> TokenBackend:
        assert isinstance(self.backend, TokenBackend), "token-level path on a chat backend"
        return self.backend

    @property
    def fmt(self) -> programs.ToolFormat:
        if self._fmt is None:
            backend = self._token_backend()
            self._fmt = programs.format_for(backend.tokenizer, backend.info.extra.get("model_path"))
        return self._fmt

    @property
    def renderer(self) -> programs.Renderer:
        if self._renderer is None:
            self._renderer = programs.Renderer(self._token_backend().tokenizer, self.fmt)
        return self._renderer

    def program(self, tools: list[dict[str, Any]], params: GenerateRequestParams) -> programs.ToolProgram:
        choice = params.tool_choice if isinstance(params.tool_choice, str) else params.tool_choice.model_dump()
        # response_format was checked (and its grammar compiled) by checked_response_format
        response = params.response_format.wire() if params.response_format is not None else None
        return programs.ToolProgram(self.fmt, tools, tool_choice=choice, parallel_tool_calls=params.parallel_tool_calls,
                                    end_of_turn=self.renderer.end_of_turn, response_format=response,
                                    jump_forward=self.cfg.jump_forward)

    def sampling(self, params: GenerateRequestParams, program: programs.ToolProgram, prompt_tokens: int) -> Sampling:
        """The engine's sampling for a prompt of `prompt_tokens`; -32002 when it leaves no room."""
        limit = self._info().context_length
        if prompt_tokens >= limit:
            raise rpc.ContextLengthExceeded(prompt_tokens, limit)
        return Sampling(
            # Room left in the context bounds the completion: it ends with 'length' there.
            max_new_tokens=min(params.max_tokens or self.cfg.default_max_tokens, limit - prompt_tokens),
            temperature=0.0 if params.temperature is None else float(params.temperature),
            top_p=1.0 if params.top_p is None else float(params.top_p),
            stop=tuple(params.stop or ()),
            seed=params.seed,
            constraint=program.constraint(),
        )

    def _info(self) -> BackendInfo:
        """The backend's info; -32004 when the engine went away meanwhile (a request awaits
        rendering in a worker thread before it reads the context length)."""
        try:
            return self.backend.info
        except BackendUnavailable:
            raise rpc.EngineUnavailable("the engine is not ready (starting, restarting, or stopped); retry shortly") from None

    def _require_ready(self) -> None:
        if not self.backend.is_ready():
            raise rpc.EngineUnavailable("the engine is not ready (starting, restarting, or stopped); retry shortly")

    check_tools = staticmethod(check_tools)

    async def checked_tools(self, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        """check_tools for a front end's request: its size first (max_tools_bytes, before any
        schema work), then the schema check in a worker thread, off the event loop."""
        if not tools:
            return self.check_tools(tools)
        return await asyncio.to_thread(sized_tools, tools, self.cfg.max_tools_bytes, self.cfg.max_schema_branches)

    async def checked_response_format(self, params: GenerateRequestParams) -> None:
        """A generate's response_format checked like tools and its grammar compiled, off the event loop."""
        if params.response_format is not None and params.response_format.type != "text":
            await asyncio.to_thread(checked_response_format, params.response_format.wire(), self.cfg.max_tools_bytes,
                                    self.cfg.max_schema_branches, chat_backend=isinstance(self.backend, ChatBackend))

    async def token_chars(self) -> int:
        """An upper bound on the characters one token decodes to: the longest vocabulary entry
        (a byte-level entry has one character per byte). Text of N characters is therefore at
        least N / token_chars tokens: the cheap check before any rendering."""
        if self._token_chars is None:
            self._token_chars = await asyncio.to_thread(longest_token, self._token_backend().tokenizer)
        return self._token_chars

    async def _check_chars(self, chars: int, *, base_tokens: int = 0, what: str = "the prompt") -> None:
        """-32002 before rendering when `chars` characters (plus `base_tokens`) cannot fit the context."""
        limit = self._info().context_length
        if chars + base_tokens < limit:  # the bound below is at most `chars`: nothing to refuse
            return
        at_least = base_tokens + math.ceil(chars / await self.token_chars())
        if at_least >= limit:
            raise rpc.ContextLengthExceeded(at_least, limit, f"{what} is at least {at_least} tokens "
                                            f"({chars} characters); the context holds {limit}")

    async def _prefix(self, system_prompt: str | None, tools: list[dict[str, Any]]) -> tuple[bytes, list[int]]:
        """The prefix's key (PrefixCache.key, also what SharedWarmups shares a warm-up by) and ids,
        both computed off the event loop; -32002 (and nothing cached) when the prefix alone does not
        fit. Agent definitions repeat across sessions: each is rendered once."""
        limit = self._info().context_length
        await self._check_chars(len(system_prompt or ""), what="the system prompt")
        key = await asyncio.to_thread(PrefixCache.key, system_prompt, tools)
        ids = self._prefix_cache.get(key)
        if ids is None:
            ids = await asyncio.to_thread(rendered, self.renderer.prefix_ids, system_prompt, tools)
            if len(ids) >= limit:
                raise rpc.ContextLengthExceeded(len(ids), limit, "the system prompt and tools alone exceed the context length")
            self._prefix_cache.put(key, ids)
        return key, ids

    async def _shared_warm(self, system_prompt: str | None, tools: list[dict[str, Any]]) -> None:
        """Warm a stateless request's agent prefix once for all the requests that start with it
        (runtime.warmup.SharedWarmups); admitted and counted like a turn."""
        if not self._info().radix_cache:
            return
        key, prefix = await self._prefix(system_prompt, tools)
        if len(prefix) < MIN_SHARED_WARM_TOKENS:
            return

        async def warm() -> None:
            self._admit()
            self.active += 1
            try:
                await warm_prefix(self._token_backend(), prefix, during="a prefix warm-up")
            finally:
                self.active -= 1

        await self.warmups.ensure(key, warm)

    # ------------------------------------------------------------------ sessions
    async def open_session(self, *, system_prompt: str | None, tools: list[dict[str, Any]] | None, owner: str) -> SessionOpenResult:
        self._require_ready()
        canonical = await self.checked_tools(tools)
        key: bytes = b""
        prefix: list[int] = []
        if isinstance(self.backend, TokenBackend):
            key, prefix = await self._prefix(system_prompt, canonical)
        warm = bool(prefix) and self._info().radix_cache
        if warm:
            # A warm-up is a prefill in the engine's queue like any turn: admitted and counted.
            self._admit()
        try:
            session = self.sessions.open(owner=owner, system_prompt=system_prompt, tools=canonical, prefix_ids=prefix)
        except SessionLimit as exc:
            raise rpc.Overloaded(5000, str(exc)) from None
        if isinstance(self.backend, ChatBackend):
            # Tokens are the server's business: the session keeps messages.
            session.messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        METRICS.sessions_open.set(len(self.sessions))
        if warm:
            self.active += 1
            try:
                # Sessions of one agent opened together share one warm-up (runtime.warmup).
                backend = self._token_backend()
                await self.warmups.ensure(key, lambda: warm_prefix(backend, prefix))
            except BaseException:
                # The client never learns this session's id: it must not hold a quota slot.
                with contextlib.suppress(SessionNotFound):
                    self.sessions.close(session.id, owner=owner)
                METRICS.sessions_open.set(len(self.sessions))
                raise
            finally:
                self.active -= 1
        return SessionOpenResult(session_id=session.id, prefix_tokens=session.prefix_tokens)

    def close_session(self, session_id: str, *, owner: str) -> SessionCloseResult:
        try:
            session = self.sessions.close(session_id, owner=owner)
        except SessionNotFound:
            raise rpc.SessionNotFound(session_id) from None
        if session.running is not None:  # its running turn ends with stream_end 'cancelled'
            session.running.set()
        METRICS.sessions_open.set(len(self.sessions))
        return SessionCloseResult()

    # ------------------------------------------------------------------ generate
    async def generate(self, params: GenerateRequestParams, *, owner: str, emit: Emit, cancelled: asyncio.Event,
                       rid: str | None = None) -> TurnOutcome:
        """Run one turn. Raises rpc.RpcError for requests refused before the engine saw them;
        once generation started, failures come back as an outcome with finish_reason 'error'."""
        self._require_ready()
        started = time.perf_counter()
        self._check_max_tokens(params)
        rid = rid or uuid.uuid4().hex
        await self.checked_response_format(params)
        if params.session_id is None:
            tools = await self.checked_tools(_dumps(params.tools))
            turn = _Turn(params, None, tools, [m.model_dump(exclude_none=True) for m in params.messages], rid, started)
            turn.owner = owner
            return await self._run(turn, emit, cancelled)
        try:
            session = self.sessions.get(params.session_id, owner=owner)
        except SessionNotFound:
            raise rpc.SessionNotFound(params.session_id) from None
        check_tool_choice(params.tool_choice, [t["function"]["name"] for t in session.tools])
        _check_not_busy(session)
        async with session.lock:
            messages = _answering_messages(session, params)
            session.running = cancelled
            try:
                out = await self._run(_Turn(params, session, session.tools, messages, rid, started), emit, cancelled)
            finally:
                session.running = None
            out.session_id = session.id
            return out

    def _check_max_tokens(self, params: GenerateRequestParams) -> None:
        if params.max_tokens is not None and params.max_tokens > self.cfg.max_tokens_cap:
            raise rpc.InvalidParams(
                f"Invalid params: max_tokens: {params.max_tokens} exceeds this server's cap of {self.cfg.max_tokens_cap}",
                {"errors": [{"field": "max_tokens", "message": f"at most {self.cfg.max_tokens_cap} (server.info limits.max_tokens_cap)"}]},
            )

    def _admit(self) -> None:
        # Counted here, synchronously, not by the backend: requests arriving in the same
        # instant must not all see an empty queue.
        if self.active >= self.cfg.max_queue:
            raise rpc.Overloaded(retry_after_ms=1000, message=f"the engine queue is full ({self.cfg.max_queue} requests); retry later")

    async def _run(self, turn: _Turn, emit: Emit, cancelled: asyncio.Event) -> TurnOutcome:
        if isinstance(self.backend, ChatBackend):
            return await self._chat(self.backend, turn, emit, cancelled)
        return await self._tokens(self._token_backend(), turn, emit, cancelled)

    async def _tokens(self, backend: TokenBackend, turn: _Turn, emit: Emit, cancelled: asyncio.Event) -> TurnOutcome:
        p, session = turn.params, turn.session
        record: Callable[[TurnOutcome], None] | None = None
        # Rendering and tokenizing a history is long for a long one: a cheap bound first (its
        # characters against the context), then the work in a worker thread, off the event loop.
        if session is None:
            system, messages = p.system_prompt, turn.messages
            if system is None and messages and messages[0]["role"] == "system":
                system, messages = messages[0].get("content") or "", messages[1:]
            await self._check_chars(len(system or "") + content_chars(messages))
            prompt, record, continued = await stateless_prompt(self.continuations, self.renderer, turn.owner, system,
                                                               turn.tools, messages)
            if not continued:  # a conversation's first turn here: its agent prefix computed once for all
                await self._shared_warm(system, turn.tools)
        else:
            await self._check_chars(content_chars(turn.messages), base_tokens=len(session.token_ids))
            new = await asyncio.to_thread(rendered, self.renderer.turn_ids, turn.messages, close_previous=session.open_turn)
            prompt = session.token_ids + new
        program = self.program(turn.tools, p)
        sampling = self.sampling(p, program, len(prompt))
        self._admit()
        self.active += 1
        try:
            out = await run_token_turn(backend, GenRequest(rid=turn.rid, input_ids=prompt, sampling=sampling), program,
                                       emit=emit, cancelled=cancelled, new_call_id=turn.new_call_id, started=turn.started)
        finally:
            self.active -= 1
        if record is not None and out.finish_reason in KEPT:
            record(out)
        if session is not None and out.finish_reason in KEPT:
            session.token_ids = prompt + out.output_ids
            session.open_turn = open_turn(self.renderer, out.output_ids)
            session.pending_calls = out.pending_calls()
            session.turns += 1
        return out

    async def _chat(self, backend: ChatBackend, turn: _Turn, emit: Emit, cancelled: asyncio.Event) -> TurnOutcome:
        p, session = turn.params, turn.session
        if session is None:
            system = [{"role": "system", "content": p.system_prompt}] if p.system_prompt is not None else []
            history = system + chat_messages(turn.messages)
        else:
            history = session.messages + chat_messages(turn.messages)
        request = ChatRequest(
            rid=turn.rid, messages=history, max_tokens=p.max_tokens or self.cfg.default_max_tokens,
            tools=chat_tools(turn.tools),
            tool_choice=p.tool_choice if isinstance(p.tool_choice, str) else p.tool_choice.model_dump(),
            parallel_tool_calls=p.parallel_tool_calls,
            temperature=0.0 if p.temperature is None else float(p.temperature),
            top_p=1.0 if p.top_p is None else float(p.top_p), stop=tuple(p.stop or ()), seed=p.seed,
        )
        self._admit()
        self.active += 1
        try:
            out = await run_chat_turn(backend, request, turn.tools, emit=emit, cancelled=cancelled,
                                      new_call_id=turn.new_call_id, started=turn.started)
        finally:
            self.active -= 1
        if session is not None and out.finish_reason in KEPT:
            reply = {"role": "assistant", "content": out.text or None, "tool_calls": out.tool_calls}
            session.messages = history + chat_messages([reply])
            session.pending_calls = out.pending_calls()
            session.turns += 1
        return out


class _Turn:
    """What one generate asks for, once the request and the session state are checked."""

    def __init__(self, params: GenerateRequestParams, session: Session | None, tools: list[dict[str, Any]],
                 messages: list[dict[str, Any]], rid: str, started: float):
        self.params = params
        self.session = session
        self.tools = tools
        self.messages = messages
        self.rid = rid
        self.started = started
        self.new_call_id: Callable[[], str] = session.next_call_id if session is not None else random_call_id
        self.owner = session.owner if session is not None else ""


def _check_not_busy(session: Session) -> None:
    # Turn N+1's prompt is turn N's output: a second concurrent turn on a session cannot be meant.
    if session.lock.locked():
        raise rpc.InvalidParams(
            "Invalid params: session_id: the session is running a turn; wait for its stream_end",
            {"errors": [{"field": "session_id", "message": "busy: one turn at a time per session"}]},
        )


def _answering_messages(session: Session, params: GenerateRequestParams) -> list[dict[str, Any]]:
    """A session turn's new messages (roles already checked by protocol); each tool result must
    answer a call of the session's last turn, and gets that call's tool name."""
    messages = [m.model_dump(exclude_none=True) for m in params.messages]
    for i, m in enumerate(messages):
        if m["role"] != "tool":
            continue
        name = session.pending_calls.get(m.get("tool_call_id", ""))
        if name is None:
            raise rpc.InvalidParams(
                f"Invalid params: messages.{i}.tool_call_id does not answer a call of the last turn",
                {"errors": [{"field": f"messages.{i}.tool_call_id",
                             "message": f"unknown call id; open calls: {sorted(session.pending_calls)}"}]},
            )
        m.setdefault("name", name)
    return messages


def _dumps(items: list[Any] | None) -> list[dict[str, Any]] | None:
    return None if items is None else [i.model_dump(exclude_none=True) for i in items]
