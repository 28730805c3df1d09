"""One message-level turn, for chat backends (INFERENCE_BACKEND=openai).

Such a backend takes OpenAI chat messages: the server's chat template renders them and its
tool parser finds the calls. Same contract as runtime.turn.run_token_turn: one TurnOutcome,
events through `emit`, every call validated against its tool's schema before it is emitted,
calls held until the turn is known not to fail (runtime.turn.Delivery), backend errors
translated by runtime.turn.drive.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from programs import validate_arguments
from runtime.backends.base import ChatBackend, ChatRequest, ChatUpdate
from runtime.metrics import METRICS
from runtime.turn import Delivery, Emit, InvalidModelOutput, TurnOutcome, checked_call, drive, random_call_id

log = logging.getLogger("runtime.chat_turn")


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """HistoryMessage dicts (protocol) -> OpenAI chat messages."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role = m["role"]
        if role == "assistant":
            calls = m.get("tool_calls") or []
            content = m.get("content")
            msg: dict[str, Any] = {"role": "assistant", "content": content if content is not None or calls else ""}
            if calls:
                msg["tool_calls"] = [
                    {"id": c["call_id"], "type": "function",
                     "function": {"name": c["name"], "arguments": json.dumps(c.get("arguments", {}), ensure_ascii=False)}}
                    for c in calls
                ]
            out.append(msg)
        elif role == "tool":
            out.append({"role": "tool", "tool_call_id": m.get("tool_call_id"), "content": m.get("content") or ""})
        else:
            out.append({"role": role, "content": m.get("content") or ""})
    return out


def chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Canonical tools -> the request's tools, marked strict so servers that constrain decoding
    (SGLang, vLLM) hold the arguments to each schema, not just to 'some JSON'."""
    out = []
    for t in tools:
        fn = dict(t["function"])
        fn["strict"] = True
        out.append({"type": "function", "function": fn})
    return out


async def run_chat_turn(
    backend: ChatBackend,
    request: ChatRequest,
    tools: list[dict[str, Any]],
    *,
    emit: Emit,
    cancelled: asyncio.Event,
    new_call_id: Callable[[], str] = random_call_id,
    started: float | None = None,
) -> TurnOutcome:
    """Run one turn on a chat backend. `tools` are the canonical tools the calls are held to."""
    started = time.perf_counter() if started is None else started
    out = TurnOutcome()
    finish: list[str | None] = [None]
    first: list[float] = []
    delivery = Delivery(out, emit)
    n_calls = [0]

    async def on_update(u: ChatUpdate) -> None:
        if not first and (u.text or u.reasoning or u.tool_calls):
            first.append(time.perf_counter())
        if u.reasoning:
            delivery.add("reasoning_chunk", {"text": u.reasoning})
        if u.text:
            delivery.add("text_chunk", {"text": u.text})
        for c in u.tool_calls:
            if n_calls[0] and not request.parallel_tool_calls:
                break  # the server ignored parallel_tool_calls=false: the first call stands
            try:
                arguments = json.loads(c.arguments or "{}")
            except ValueError:
                problems = [f"arguments are not JSON: {c.arguments[:200]!r}"]
            else:
                tool = next((t for t in tools if t["function"]["name"] == c.name), None)
                problems = ["unknown tool"] if tool is None else validate_arguments(tool, arguments)
            if problems and u.finish_reason == "length":
                log.info("dropping a tool call cut short by max_tokens: %s", "; ".join(problems[:3]))
                continue  # not a complete call; the turn ends with 'length'
            if problems:
                METRICS.invalid_calls.inc()
                raise InvalidModelOutput(f"the model produced an invalid call of {c.name!r}: {'; '.join(problems[:3])}")
            delivery.add("function_call_request", checked_call(c.name, arguments, tools, new_call_id))
            n_calls[0] += 1
        if u.prompt_tokens is not None:
            out.prompt_tokens, out.cached_tokens = int(u.prompt_tokens), int(u.cached_tokens)
        if u.completion_tokens is not None:
            out.completion_tokens = int(u.completion_tokens)
        if u.finish_reason is not None:
            finish[0] = "length" if u.finish_reason == "length" else "stop"
        await delivery.send()  # text goes at once; a call (and what follows it) waits for the end

    async def pump() -> None:
        async for u in backend.chat(request):
            await on_update(u)
        await delivery.send(final=True)  # the stream ended without fault: the calls go

    await drive(pump, out, cancelled, lambda: finish[0])
    if out.finish_reason == "cancelled":
        await delivery.send(final=True)  # a cancelled turn is kept with the calls it completed
    out.ttft_ms = (first[0] - started) * 1000 if first else None
    out.total_ms = (time.perf_counter() - started) * 1000
    METRICS.observe_turn(out)
    return out
