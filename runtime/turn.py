"""One token-level turn: prompt ids -> the backend's stream -> the program's parser -> events.

This is the only place a token turn is driven. The service runs it for session and stateless
requests, the benchmark runs it through the service (and directly for its re-rendering
client), the tests run it on the real engine and on the fake backend:

    run_token_turn(backend, request, program, emit=..., cancelled=..., new_call_id=...)

The contract:
- `emit(kind, payload)` gets `text_chunk` / `reasoning_chunk` / `function_call_request`
  events in order; every call is complete and valid against its tool's schema before it is
  emitted, and gets its id from `new_call_id()`.
- The result is a TurnOutcome: finish_reason 'stop' | 'length' | 'tool_calls' | 'cancelled'
  | 'error' (then `error` holds the JSON-RPC error), usage, timings and the output token ids.
  Failures after the request reached the backend are values, never exceptions; only a
  cancellation of the caller's own task propagates.
- Setting `cancelled` stops the stream (the backend frees the engine slot) and ends the turn
  with 'cancelled'.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from programs import InvalidOutput, ReasoningDelta, StreamParser, TextDelta, ToolCallEvent, ToolProgram, validate_arguments
from protocol import errors as rpc
from protocol.models import FinishReason, GenerateResult, Timings, Usage
from runtime.backends.base import (
    BackendContextLength,
    BackendError,
    BackendOverloaded,
    BackendUnavailable,
    GenRequest,
    TokenBackend,
)
from runtime.metrics import METRICS

log = logging.getLogger("runtime.turn")

Emit = Callable[[str, dict[str, Any]], Awaitable[None]]
KEPT = ("stop", "length", "tool_calls", "cancelled")  # outcomes a session appends


@dataclass
class TurnOutcome:
    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: FinishReason = "error"
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float | None = None  # None: no token was produced
    total_ms: float = 0.0
    error: rpc.RpcError | None = None
    session_id: str | None = None
    prompt_ids: list[int] = field(default_factory=list)  # token backends: what the engine was given
    output_ids: list[int] = field(default_factory=list)  # token backends: what the engine generated

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, cached_tokens=self.cached_tokens,
                     completion_tokens=self.completion_tokens)

    def timings(self) -> Timings:
        ttft = None if self.ttft_ms is None else round(self.ttft_ms, 3)
        return Timings(ttft_ms=ttft, total_ms=round(self.total_ms, 3))

    def result(self) -> GenerateResult:
        """The generate response of a turn that did not fail."""
        return GenerateResult.model_validate({
            "text": self.text, "tool_calls": self.tool_calls, "finish_reason": self.finish_reason,
            "usage": self.usage(), "timings": self.timings(),
        })

    def pending_calls(self) -> dict[str, str]:
        """call_id -> tool name of this turn's calls: what the next turn's tool results answer."""
        return {c["call_id"]: c["name"] for c in self.tool_calls}


class InvalidModelOutput(Exception):
    """The model's output broke the program (an invalid call): the turn fails, no call is sent."""


async def emit_call(name: str, arguments: Any, tools: list[dict[str, Any]], out: TurnOutcome, emit: Emit,
                    new_call_id: Callable[[], str]) -> None:
    """Validate one complete call against its tool's schema, give it an id, send it."""
    tool = next((t for t in tools if t["function"]["name"] == name), None)
    problems = ["unknown tool"] if tool is None else validate_arguments(tool, arguments)
    if problems:
        METRICS.invalid_calls.inc()
        raise InvalidModelOutput(f"the model produced an invalid call of {name!r}: {'; '.join(problems[:3])}")
    call = {"call_id": new_call_id(), "name": name, "arguments": arguments}
    out.tool_calls.append(call)
    await emit("function_call_request", call)


def random_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:16]}"


class _TextFeed:
    """The part of the backend's cumulative text that is new to the parser.

    A detokenizer can revise the tail of its text (a trailing U+FFFD stands for an incomplete
    UTF-8 sequence until the next token completes it): that tail is held back until it is
    final. Text already given to the parser is never given again.
    """

    def __init__(self) -> None:
        self.fed = ""

    def new(self, text: str, *, final: bool = False) -> str:
        safe = text if final else text.rstrip("\ufffd")
        if not safe.startswith(self.fed):
            # Revised below what the parser already has: keep what it has, go on after it.
            log.debug("the backend revised text already parsed (%d chars fed, %d now)", len(self.fed), len(safe))
        delta = safe[len(self.fed):]
        self.fed = safe if len(safe) >= len(self.fed) else self.fed
        return delta


async def run_token_turn(
    backend: TokenBackend,
    request: GenRequest,
    program: ToolProgram,
    *,
    emit: Emit,
    cancelled: asyncio.Event,
    new_call_id: Callable[[], str] = random_call_id,
    started: float | None = None,
) -> TurnOutcome:
    """Run one turn on a token backend; see the module docstring for the contract."""
    started = time.perf_counter() if started is None else started
    out = TurnOutcome(prompt_tokens=len(request.input_ids), prompt_ids=request.input_ids)
    parser = StreamParser(program)
    feed = _TextFeed()
    engine_finish: list[str | None] = [None]
    first: list[float] = []

    async def handle(events: list[Any]) -> None:
        for ev in events:
            if isinstance(ev, TextDelta):
                if ev.text:
                    out.text += ev.text
                    await emit("text_chunk", {"text": ev.text})
            elif isinstance(ev, ReasoningDelta):
                if ev.text:
                    await emit("reasoning_chunk", {"text": ev.text})
            elif isinstance(ev, ToolCallEvent):
                await emit_call(ev.name, ev.arguments, program.tools, out, emit, new_call_id)
            elif isinstance(ev, InvalidOutput):
                if engine_finish[0] == "length":
                    continue  # a call cut off by max_tokens: the turn ends with 'length', no call
                METRICS.invalid_calls.inc()
                raise InvalidModelOutput(ev.reason)

    async def pump() -> None:
        text = ""
        async for u in backend.stream(request):
            if not first and (u.completion_tokens or u.output_ids):
                first.append(time.perf_counter())
            text, out.output_ids = u.text, list(u.output_ids)
            out.cached_tokens, out.completion_tokens = u.cached_tokens, u.completion_tokens
            delta = feed.new(text)
            if delta:
                await handle(parser.feed(delta))
            if u.finish_reason is not None:
                engine_finish[0] = u.finish_reason
        delta = feed.new(text, final=True)
        if delta:
            await handle(parser.feed(delta))
        await handle(parser.finish())

    await drive(pump, out, cancelled, lambda: engine_finish[0])
    out.ttft_ms = (first[0] - started) * 1000 if first else None
    out.total_ms = (time.perf_counter() - started) * 1000
    if out.finish_reason == "error" and out.error is None and engine_finish[0] == "abort":
        out.error = rpc.InternalError("the engine aborted the request")
    METRICS.observe_turn(out)
    return out


async def drive(pump: Callable[[], Coroutine[Any, Any, None]], out: TurnOutcome, cancelled: asyncio.Event,
                engine_finish: Callable[[], str | None]) -> None:
    """Run `pump` until it ends or `cancelled` is set; record finish_reason and error in `out`.

    The one place backend errors become JSON-RPC errors. Failures after generation started
    become an outcome (the caller still answers); only a cancellation of the caller itself
    propagates.
    """
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
            out.finish_reason = finish_reason(engine_finish(), out.tool_calls, cancelled=cancelled.is_set())
    except InvalidModelOutput as exc:
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


def finish_reason(engine_reason: str | None, calls: list[Any], *, cancelled: bool) -> FinishReason:
    if engine_reason == "abort":
        return "cancelled" if cancelled else "error"
    if calls:
        return "tool_calls"
    return "length" if engine_reason == "length" else "stop"
