"""The `openai` mode: the workload through this runtime's /v1/chat/completions, as an agent
framework's stateless client sends it.

The real `openai` package (AsyncOpenAI, one client per session, no retries: a refused request
is a failed turn, not a hidden one) re-sends the whole history every turn: the system prompt,
the same tools, and every earlier message. Assistant messages go back the way LangChain keeps
and converts them (langchain-openai's `_convert_message_to_dict`): the tool-call arguments
parsed into a dict and dumped again with `json.dumps(args, ensure_ascii=False)` (", " and ": "
separators, whatever the runtime sent), and `content: null` for a message with only tool
calls. Plain (not streamed) requests, as LangChain's `invoke` sends them.

Measured from the responses: `usage.prompt_tokens`, `usage.completion_tokens` and
`usage.prompt_tokens_details.cached_tokens` (the hit rate is the server's own count), and the
time to first token from the response's `Server-Timing` header (`ttft;dur=...`: the runtime's
own first-token time, as the `server` mode reads it from stream_end; a client sees a tool call
only when it is complete). Without that header the turn's end-to-end time stands in.
"""

from __future__ import annotations

import json
import time
from typing import Any

from bench.modes import TurnResult
from bench.workload import SessionPlan, TurnPlan, Workload


def server_timing(header: str | None) -> dict[str, float]:
    """The `dur` of each metric of a Server-Timing header, in ms ({'ttft': 12.5, 'total': 80.0})."""
    out: dict[str, float] = {}
    for metric in (header or "").split(","):
        name, *params = (p.strip() for p in metric.split(";"))
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "dur":
                try:
                    out[name] = float(value.strip().strip('"'))
                except ValueError:
                    pass
    return out


def langchain_assistant(message: Any) -> dict[str, Any]:
    """A response's assistant message as LangChain sends it back in the next request's history:
    arguments re-dumped from the parsed dict, content None when only tool calls came back."""
    out: dict[str, Any] = {"role": "assistant", "content": message.content or ""}
    if message.tool_calls:
        out["tool_calls"] = [
            {"type": "function", "id": c.id,
             "function": {"name": c.function.name,
                          "arguments": json.dumps(json.loads(c.function.arguments) if c.function.arguments else {},
                                                  ensure_ascii=False)}}
            for c in message.tool_calls
        ]
        out["content"] = out["content"] or None
    return out


class OpenAIDriver:
    """A stateless client of /v1/chat/completions (see the module docstring)."""

    def __init__(self, base_url: str, workload: Workload, *, model: str, api_key: str = "unused", timeout_s: float = 900.0):
        self.base_url = base_url
        self.workload = workload
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s

    async def open(self, sp: SessionPlan) -> dict[str, Any]:
        import openai

        agent = self.workload.agents[sp.agent]
        client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, max_retries=0, timeout=self.timeout_s)
        return {"client": client, "tools": agent.tools, "history": [{"role": "system", "content": agent.system_prompt}]}

    async def turn(self, h: dict[str, Any], messages: list[dict], plan: TurnPlan) -> TurnResult:
        import openai

        history = h["history"] + [dict(m) for m in messages]
        started = time.perf_counter()
        try:
            raw = await h["client"].chat.completions.with_raw_response.create(
                model=self.model, messages=history, tools=h["tools"], tool_choice=plan.tool_choice,
                parallel_tool_calls=plan.parallel_tool_calls, max_tokens=plan.max_tokens, temperature=0.0)
            completion = raw.parse()
        except openai.APIStatusError as exc:  # the server's error (OpenAI's shape)
            return TurnResult(error=f"HTTP {exc.status_code}: {exc.message}", finish_reason="error",
                              e2e_ms=(time.perf_counter() - started) * 1000)
        e2e = (time.perf_counter() - started) * 1000
        usage = completion.usage
        details = usage.prompt_tokens_details if usage is not None else None
        if usage is None or details is None or details.cached_tokens is None:
            raise ValueError("the response has no usage.prompt_tokens_details.cached_tokens")
        choice = completion.choices[0]
        assistant = langchain_assistant(choice.message)
        h["history"] = history + [assistant]
        calls = [{"call_id": c["id"], "name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
                 for c in assistant.get("tool_calls", [])]
        return TurnResult(
            text=choice.message.content or "", tool_calls=calls, finish_reason=choice.finish_reason,
            prompt_tokens=usage.prompt_tokens, cached_tokens=details.cached_tokens,
            completion_tokens=usage.completion_tokens,
            ttft_ms=server_timing(raw.headers.get("server-timing")).get("ttft", e2e), e2e_ms=e2e,
        )

    async def close(self, h: dict[str, Any]) -> None:
        await h["client"].close()
