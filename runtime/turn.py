"""One token-level turn: prompt ids -> the backend's stream -> the program's parser -> events.

This is the only place a token turn is driven. The service runs it for session and stateless
requests, the benchmark runs it through the service (and directly for its re-rendering
client), the tests run it on the real engine and on the fake backend:

    run_token_turn(backend, request, program, emit=..., cancelled=..., new_call_id=...)

The contract:
- `emit(kind, payload)` gets `text_chunk` / `reasoning_chunk` / `function_call_request`
  events in order; every call is complete and valid against its tool's schema before it is
  emitted, and gets its id from `new_call_id()`.
- Calls are sent only once the turn is known not to fail: a call, and everything after it, is
  held until the stream has ended and the parser has accepted the whole output (or until the
  turn is cancelled, which keeps it). A turn that fails sends none of its calls, so no call a
  client may have acted on is ever forgotten by its session. (The grammar ends the turn right
  after its calls, so holding them costs little.)
- What a kept turn (stop / length / tool_calls / cancelled) keeps is what the client got:
  text the parser still holds back when the turn ends (a partial end-of-turn marker, a call cut
  off by max_tokens or a cancel) is neither sent nor kept; `output_ids` is cut to the last
  point where everything before it had been sent.
- The result is a TurnOutcome: finish_reason 'stop' | 'length' | 'tool_calls' | 'cancelled'
  | 'error' (then `error` holds the JSON-RPC error), usage, timings and the output token ids.
  Failures after the request reached the backend are values, never exceptions; only a
  cancellation of the caller's own task propagates.
- Setting `cancelled` stops the stream (the backend frees the engine slot) and ends the turn
  with 'cancelled'.
- With a response format (program.response), the text of a turn that ended on its own is
  validated as one JSON value of that format before the turn is accepted (check_response).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from programs import InvalidOutput, ReasoningDelta, StreamParser, TextDelta, ToolCallEvent, ToolProgram, validate_arguments, validate_response
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
    prompt_ids: list[int] = field(default_factory=list)  # token backends: the prompt (prompt_ids + output_ids: the sequence)
    output_ids: list[int] = field(default_factory=list)  # token backends: the turn's output (forced + generated)
    forced_tokens: int = 0  # output tokens the program forced (jump-forward): appended, not decoded

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


def checked_call(name: str, arguments: Any, tools: list[dict[str, Any]], new_call_id: Callable[[], str]) -> dict[str, Any]:
    """Validate one complete call against its tool's schema and give it an id."""
    tool = next((t for t in tools if t["function"]["name"] == name), None)
    problems = ["unknown tool"] if tool is None else validate_arguments(tool, arguments)
    if problems:
        METRICS.invalid_calls.inc()
        raise InvalidModelOutput(f"the model produced an invalid call of {name!r}: {'; '.join(problems[:3])}")
    return {"call_id": new_call_id(), "name": name, "arguments": arguments}


class Delivery:
    """A turn's events on their way to the client, in generation order.

    `add` records an event; `send(upto)` sends the recorded events before index `upto` and
    adds them to the outcome (`text`, `tool_calls`): the outcome is exactly what was sent.
    While the turn runs, a call stops sending (it and what follows wait); `final=True`, once
    the turn is known not to fail, sends calls too."""

    def __init__(self, out: TurnOutcome, emit: Emit):
        self.out = out
        self.emit = emit
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.sent = 0

    def add(self, kind: str, payload: dict[str, Any]) -> None:
        self.events.append((kind, payload))

    async def send(self, upto: int | None = None, *, final: bool = False) -> None:
        upto = len(self.events) if upto is None else upto
        while self.sent < upto:
            kind, payload = self.events[self.sent]
            if kind == "function_call_request" and not final:
                return
            self.sent += 1
            if kind == "text_chunk":
                self.out.text += payload["text"]
            elif kind == "function_call_request":
                self.out.tool_calls.append(payload)
            await self.emit(kind, payload)


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
    forced, request = jump_forward(backend, request, program)
    out.forced_tokens = len(forced)
    parser = StreamParser(program)
    feed = _TextFeed()
    engine_finish: list[str | None] = [None]
    first: list[float] = []
    delivery = Delivery(out, emit)
    ids: list[int] = []
    # The last point where the client had been given everything the output held: (events, ids).
    clean = [0, 0]

    def handle(events: list[Any]) -> None:
        for ev in events:
            if isinstance(ev, TextDelta):
                if ev.text:
                    delivery.add("text_chunk", {"text": ev.text})
            elif isinstance(ev, ReasoningDelta):
                if ev.text:
                    delivery.add("reasoning_chunk", {"text": ev.text})
            elif isinstance(ev, ToolCallEvent):
                delivery.add("function_call_request", checked_call(ev.name, ev.arguments, program.tools, new_call_id))
            elif isinstance(ev, InvalidOutput):
                if engine_finish[0] == "length":
                    continue  # a call cut off by max_tokens: the turn ends with 'length', no call
                METRICS.invalid_calls.inc()
                raise InvalidModelOutput(ev.reason)

    def mark_clean(text_final: bool) -> None:
        if text_final and not parser.holding():
            clean[0], clean[1] = len(delivery.events), len(ids)

    async def pump() -> None:
        nonlocal ids
        text = ""
        if forced:  # the forced opening is the output's start, as if decoded
            ids = list(forced)
            handle(parser.feed(program.forced))
        async for u in backend.stream(request):
            if not first and (u.completion_tokens or u.output_ids):
                first.append(time.perf_counter())
            text, ids = u.text, forced + u.output_ids if forced else u.output_ids  # a fresh list per update
            out.output_ids = ids
            out.cached_tokens = min(u.cached_tokens, out.prompt_tokens)
            out.completion_tokens = len(forced) + u.completion_tokens
            delta = feed.new(text)
            if delta:
                handle(parser.feed(delta))
            if u.finish_reason is not None:
                engine_finish[0] = u.finish_reason
            mark_clean(not text.endswith("\ufffd"))
            await delivery.send(clean[0])
        delta = feed.new(text, final=True)
        if delta:
            handle(parser.feed(delta))
        handle(parser.finish())
        check_response(program, delivery.events, engine_finish[0], request.sampling.stop)
        mark_clean(True)
        # The whole output parsed without fault: the turn cannot fail any more; held calls go.
        await delivery.send(clean[0], final=True)

    await drive(pump, out, cancelled, lambda: engine_finish[0])
    if out.finish_reason == "cancelled":
        # Kept up to where it stopped: what had been completed, held calls included, is sent.
        await delivery.send(clean[0], final=True)
    if out.finish_reason in KEPT:
        out.output_ids = ids[: clean[1]]
    out.ttft_ms = (first[0] - started) * 1000 if first else None
    out.total_ms = (time.perf_counter() - started) * 1000
    if out.finish_reason == "error" and out.error is None and engine_finish[0] == "abort":
        out.error = rpc.InternalError("the engine aborted the request")
    METRICS.observe_turn(out)
    return out


def check_response(program: ToolProgram, events: list[tuple[str, dict[str, Any]]], engine_finish: str | None,
                   stop: tuple[str, ...]) -> None:
    """A response-format turn that ended on its own (no calls, not cut by max_tokens, an abort or
    a client's stop string): its text must be one JSON value valid in the format. The grammar
    makes it so; this is the cross-check, as calls are validated (the text has streamed already:
    a failure fails the turn, which a session then does not keep)."""
    fmt = program.response
    if fmt is None or engine_finish in ("length", "abort") or stop:
        return
    if any(kind == "function_call_request" for kind, _ in events):
        return
    text = "".join(payload["text"] for kind, payload in events if kind == "text_chunk")
    problems = validate_response(fmt, text)
    if problems:
        raise InvalidModelOutput(f"the model's text is not valid for response_format {fmt.kind}: {'; '.join(problems[:3])}")


def jump_forward(backend: TokenBackend, request: GenRequest, program: ToolProgram) -> tuple[list[int], GenRequest]:
    """The ids of the text the program forces at the start of the turn (program.forced), and the
    request that continues after them: they are appended to the prompt instead of decoded one
    step each (the constraint already starts after them), and count against max_new_tokens.
    When they would use it all, nothing is forced: the turn decodes its opening from the
    unforced constraint and ends with 'length' at max_tokens, as without jump-forward."""
    if not program.forced:
        return [], request
    forced = list(backend.tokenizer.encode(program.forced, add_special_tokens=False))
    budget = request.sampling.max_new_tokens
    if len(forced) >= budget:
        # max_tokens ends the turn inside the opening: decode it as usual (cut at max_tokens, no call).
        sampling = dataclasses.replace(request.sampling, constraint=program.unforced_constraint())
        return [], GenRequest(rid=request.rid, input_ids=request.input_ids, sampling=sampling)
    METRICS.forced_tokens.inc(len(forced))
    sampling = dataclasses.replace(request.sampling, max_new_tokens=budget - len(forced))
    return forced, GenRequest(rid=request.rid, input_ids=request.input_ids + forced, sampling=sampling)


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
