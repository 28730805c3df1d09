"""Prompt rendering in segments a session can append to.

A session's token ids are append-only:

    prefix_ids(system, tools)                      system prompt + tools block, canonical
    + turn_ids(new messages of turn 1)             ... ending with the assistant generation prompt
    + the model's output ids of turn 1             (they end with the end-of-turn token when it
                                                    stopped on it; else turn_ids(close_previous=True)
                                                    emits the end-of-turn first)
    + turn_ids(new messages of turn 2) + ...

full_ids() composes the same segments for a whole history (assistant messages rendered in the
format's canonical call syntax), so a stateless request and a session agree token for token
wherever the model's output tokens equal the canonical tokenization of its text.

Segment texts come from the model's chat template (apply_chat_template), so the prompt is the
one the model was trained on: each segment is the difference between the template's rendering
of a small stand-in conversation with and without the new messages, cut right after an
end-of-turn token. Every segment boundary therefore sits next to a special token (the
end-of-turn before a turn, the template's role header before an assistant message), where a
BPE tokenizer splits anyway, which is why tokenizing segment by segment gives the ids that
tokenizing the whole text gives (the tests check this on the default tokenizer).

Formats whose template renders tools get `tools=` (canonical) and tool_calls/tool messages in
the Hugging Face shape; the "default" format writes its own tools block into the system message,
calls into the assistant content, and tool results as a user message of <tool_response> blocks.
"""

from __future__ import annotations

import json
import os
from typing import Any

from programs.formats import DEFAULT_TOOLS_FOOTER, DEFAULT_TOOLS_HEADER, ToolFormat
from programs.schema import canonical_tools

__all__ = ["Renderer", "RenderError"]

_S, _U, _A, _B, _X = "\u2063S\u2063", "\u2063U\u2063", "\u2063A\u2063", "\u2063B\u2063", "\u2063X\u2063"


class RenderError(ValueError):
    """The messages cannot be rendered (bad history shape, or a template this renderer cannot segment)."""


class Renderer:
    def __init__(self, tokenizer: Any, fmt: ToolFormat):
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.end_of_turn: str = fmt.end_of_turn or tokenizer.eos_token
        if not self.end_of_turn:
            raise RenderError("the tokenizer has no eos_token and the format names no end-of-turn token")
        self.end_of_turn_ids: list[int] = self._encode(self.end_of_turn)
        self._template_kwargs = dict(fmt.template_kwargs)

    # ------------------------------------------------------------------ public
    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end an assistant turn (the end-of-turn token, plus the tokenizer's eos)."""
        ids = list(self.end_of_turn_ids) if len(self.end_of_turn_ids) == 1 else []
        for text in self.fmt.stop_texts:  # further single-token stops of the format (kept in the output)
            extra = self._encode(text)
            if len(extra) == 1 and extra[0] not in ids:
                ids.append(extra[0])
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if isinstance(eos, int) and eos not in ids:
            ids.append(eos)
        return ids

    def prefix_ids(self, system_prompt: str | None, tools: list[dict] | None) -> list[int]:
        return self._encode(self.prefix_text(system_prompt, tools))

    def turn_ids(self, messages: list[dict], *, close_previous: bool) -> list[int]:
        ids = self._encode(self.turn_text(messages))
        return (list(self.end_of_turn_ids) + ids) if close_previous else ids

    def assistant_ids(self, message: dict) -> list[int]:
        return self._encode(self.assistant_text(message))

    def full_ids(self, system_prompt: str | None, tools: list[dict] | None, messages: list[dict]) -> list[int]:
        ids: list[int] = []
        for segment in self.segments(system_prompt, tools, messages):
            ids += self._encode(segment)
        return ids

    # ------------------------------------------------------------------ texts
    def segments(self, system_prompt: str | None, tools: list[dict] | None, messages: list[dict]) -> list[str]:
        """The texts full_ids() tokenizes one by one: prefix, then turns and assistant messages."""
        messages = list(messages)
        if messages and messages[0].get("role") == "system" and system_prompt is None:
            system_prompt, messages = messages[0].get("content") or "", messages[1:]
        return [self.prefix_text(system_prompt, tools)] + self.history_segments(messages)

    def tail_ids(self, messages: list[dict], *, close_previous: bool) -> list[int]:
        """The ids of the messages after an assistant message whose ids are known (a continued
        history): segment by segment as full_ids renders them, with the end-of-turn token first
        when that assistant output had not written it (close_previous, as turn_ids)."""
        ids = list(self.end_of_turn_ids) if close_previous else []
        for segment in self.history_segments(messages):
            ids += self._encode(segment)
        return ids

    def history_segments(self, messages: list[dict]) -> list[str]:
        """The messages after the prefix as texts: each turn of user / tool / system messages,
        each assistant message; the history ends with a turn (a user or tool message)."""
        if not messages or messages[-1].get("role") == "assistant":
            raise RenderError("the history must end with a user or tool message")
        out: list[str] = []
        group: list[dict] = []
        for m in messages:
            if m.get("role") == "assistant":
                out.append(self.turn_text(group))
                out.append(self.assistant_text(m))
                group = []
            else:
                group.append(m)
        out.append(self.turn_text(group))
        return out

    def prefix_text(self, system_prompt: str | None, tools: list[dict] | None) -> str:
        system = self._system_messages(system_prompt, tools)
        template_tools = canonical_tools(tools) if (self.fmt.template_tools and tools) else None
        a = self._render(system + [{"role": "user", "content": _A}], template_tools, gen=False)
        b = self._render(system + [{"role": "user", "content": _B}], template_tools, gen=False)
        common = os.path.commonprefix([a, b])
        cut = common.rfind(self.end_of_turn)
        return common[: cut + len(self.end_of_turn)] if cut >= 0 else ""

    def turn_text(self, messages: list[dict]) -> str:
        for m in messages:
            if m.get("role") not in ("user", "tool", "system"):
                raise RenderError(f"a turn holds user, tool or system messages, not {m.get('role')!r}")
        context = self._stand_in_context(messages)
        before = self._render(self._template_messages(context), None, gen=False)
        cut = before.rfind(self.end_of_turn)
        if cut < 0:
            raise RenderError("the chat template does not end an assistant message with the end-of-turn token")
        cut += len(self.end_of_turn)
        after = self._render(self._template_messages(context + list(messages)), None, gen=True)
        if after[:cut] != before[:cut]:
            raise RenderError("the chat template re-renders earlier messages when new ones are added")
        return after[cut:]

    def assistant_text(self, message: dict) -> str:
        """An assistant message as the model would write it: content, calls, end-of-turn."""
        context = [{"role": "system", "content": _S}, {"role": "user", "content": _U}]
        head = self._render(context, None, gen=True)
        full = self._render(self._template_messages(context + [message]), None, gen=False)
        if not full.startswith(head):
            raise RenderError("the chat template's generation prompt is not a prefix of its assistant rendering")
        body = full[len(head):]
        end = body.rfind(self.end_of_turn)
        return body[: end + len(self.end_of_turn)] if end >= 0 else body + self.end_of_turn

    def tools_block(self, tools: list[dict]) -> str:
        """The default format's tools block: one canonical compact JSON tool per line."""
        lines = [json.dumps(t, ensure_ascii=False, separators=(",", ":")) for t in canonical_tools(tools)]
        return DEFAULT_TOOLS_HEADER + "\n".join(lines) + DEFAULT_TOOLS_FOOTER

    # ------------------------------------------------------------------ helpers
    def _encode(self, text: str) -> list[int]:
        # Templates write BOS themselves when they want it.
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def _render(self, messages: list[dict], tools: list[dict] | None, *, gen: bool) -> str:
        kwargs = dict(self._template_kwargs)
        if tools:
            kwargs["tools"] = tools
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=gen, **kwargs
        )

    def _system_messages(self, system_prompt: str | None, tools: list[dict] | None) -> list[dict]:
        if self.fmt.template_tools:
            return [{"role": "system", "content": system_prompt}] if system_prompt else []
        parts = [p for p in (system_prompt, self.tools_block(tools) if tools else None) if p]
        return [{"role": "system", "content": "\n\n".join(parts)}] if parts else []

    def _stand_in_context(self, messages: list[dict]) -> list[dict]:
        """system, user, assistant stand-ins; the assistant carries the calls that leading tool
        messages answer, so templates that check the pairing render them as in a real history."""
        calls: list[dict[str, Any]] = []
        for m in messages:
            if m.get("role") != "tool":
                break
            calls.append({"call_id": m.get("tool_call_id") or "call_0", "name": m.get("name") or "tool", "arguments": {}})
        assistant: dict[str, Any] = {"role": "assistant", "content": _X}
        if calls:
            assistant["tool_calls"] = calls
        return [{"role": "system", "content": _S}, {"role": "user", "content": _U}, assistant]

    def _template_messages(self, messages: list[dict]) -> list[dict]:
        """Protocol messages -> what the chat template takes."""
        fmt = self.fmt
        out: list[dict] = []
        for m in messages:
            role, content = m.get("role"), m.get("content") or ""
            calls = m.get("tool_calls") or []
            if role == "assistant":
                if fmt.template_tools:
                    msg: dict[str, Any] = {"role": "assistant", "content": content}
                    if calls:
                        msg["tool_calls"] = [
                            {"id": c.get("call_id"), "type": "function",
                             "function": {"name": c["name"], "arguments": c.get("arguments") or {}}}
                            for c in calls
                        ]
                    out.append(msg)
                else:
                    text = fmt.call_separator.join(fmt.call_text(c["name"], c.get("arguments") or {}) for c in calls)
                    out.append({"role": "assistant", "content": content + text})
            elif role == "tool":
                if fmt.template_tools:
                    out.append({"role": "tool", "content": content, "tool_call_id": m.get("tool_call_id"),
                                **({"name": m["name"]} if m.get("name") else {})})
                else:
                    block = fmt.tool_result_begin + content + fmt.tool_result_end
                    prev = out[-1] if out else None
                    if prev is not None and prev.get("_tool_results"):
                        prev["content"] += fmt.tool_result_joiner + block
                    else:
                        out.append({"role": fmt.tool_result_role, "content": block, "_tool_results": True})
            else:
                out.append({"role": role, "content": content})
        for msg in out:
            msg.pop("_tool_results", None)
        return out
