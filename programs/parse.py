"""Streaming parse of one assistant turn into text, reasoning and tool calls.

Stages, each SGLang's own parser where one exists:
  1. the end-of-turn token's text (decoded with special tokens kept) is removed;
  2. reasoning (formats with a reasoning parser): sglang.srt.parser.reasoning_parser.ReasoningParser;
  3. tool calls: sglang.srt.function_call.function_call_parser.FunctionCallParser with the
     format's detector. Its streaming results (name, then argument pieces per tool_index) are
     gathered per call; a call is emitted once its arguments form a complete JSON object and
     validate against the tool's schema. The detector is fed one character at a time (see
     _normal). At finish the detector's one-shot parse of the whole text is the cross-check: a
     call it finds that streaming did not complete is emitted then.

Text inside a call never becomes TextDelta. Whitespace between or after calls (the separators)
is dropped. In `none` mode (or with no tools) there is no call parsing at all: every
character is text, so no ToolCallEvent can come out.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from programs.program import ToolProgram
from programs.schema import validate_arguments

__all__ = ["TextDelta", "ReasoningDelta", "ToolCallEvent", "InvalidOutput", "Event", "StreamParser"]


@contextlib.contextmanager
def _sglang_parse_errors_quiet():
    """SGLang's detectors log an ERROR when a call's JSON is incomplete (a call cut off by
    max_tokens is an ordinary 'length' finish here, reported to the client as such): keep
    that out of the host's logs while this module decides what the text means."""
    log = logging.getLogger("sglang.srt.function_call")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ToolCallEvent:
    name: str
    arguments: dict
    index: int = 0  # position of the call in the turn (0-based)


@dataclass(frozen=True)
class InvalidOutput:
    reason: str


Event = TextDelta | ReasoningDelta | ToolCallEvent | InvalidOutput

# Stripped when neither the program nor the format names the end-of-turn text.
_COMMON_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>")


def _sglang_tools(tools: list[dict]) -> list[Any]:
    from sglang.srt.entrypoints.openai.protocol import Function, Tool

    return [
        Tool(type="function", function=Function(
            name=t["function"]["name"], description=t["function"].get("description"),
            parameters=t["function"]["parameters"], strict=True))
        for t in tools
    ]


@dataclass
class _Call:
    name: str | None = None
    args: str = ""
    done: bool = False


class StreamParser:
    """The parser of one turn's output. SGLang's parsers are imported on first use: a process
    that also runs SGLang's engine prepares SGLang's environment before that
    (runtime.sglang_adapter.prepare), as the runtime, the bench and the tests do at start."""

    def __init__(self, program: ToolProgram):
        self.program = program
        fmt = program.fmt
        eot = program.end_of_turn or fmt.end_of_turn
        self._eot_texts = [eot] if eot else list(_COMMON_END_OF_TURN)
        self._hold = ""  # a suffix that may be the start of an end-of-turn text
        self._raw = ""  # all normal (non-reasoning) text, for the final cross-check
        self._reasoning = None
        self._fcp = None
        self._calls: dict[int, _Call] = {}
        self._emitted: set[int] = set()
        self._n_ok = 0
        self._ws_after_call = ""
        self._finished = False
        # Reasoning comes first: once the answer has begun (non-whitespace normal text), a
        # "<think>" inside it (a tool argument, say) is answer text, not a new reasoning block.
        self._answer_started = False
        # Formats whose calls can only open the message (text_before_calls False): the text is
        # held until it shows whether it starts with a call; if not, the detector never sees it
        # (llama3's detector would take any leading JSON object for a call). A response format's
        # turn is the same: its calls or its JSON value, and a JSON string may hold the trigger.
        self._lead = "" if ((not fmt.text_before_calls or program.response) and fmt.call_trigger) else None
        self._marker_hold = ""
        markers = sorted(fmt.atomic_markers, key=len, reverse=True)
        self._markers = re.compile("(" + "|".join(map(re.escape, markers)) + ")") if markers else None
        # Characters where a detector's state can change: JSON structure, escapes, line breaks and
        # the first character of every marker and trigger. A run of other characters can neither
        # begin nor end anything, so it is fed as one piece: fed one character at a time, a long
        # argument cost time quadratic in its length (SGLang's detectors re-parse their whole
        # buffer on every feed).
        firsts = {m[0] for m in (*fmt.atomic_markers, fmt.call_trigger or "", fmt.reasoning_begin or "",
                                 fmt.reasoning_end or "") if m}
        special = "".join(re.escape(c) for c in sorted(set('{}[]":,\\\n<>') | firsts))
        self._runs = re.compile(f"[{special}]|[^{special}]+")
        self._special = re.compile(f"[{special}]")
        self._run_hold = ""  # a run inside a call, fed with what follows it
        if fmt.reasoning_parser:
            from sglang.srt.parser.reasoning_parser import ReasoningParser

            self._reasoning = ReasoningParser(fmt.reasoning_parser, stream_reasoning=True,
                                              force_reasoning=fmt.reasoning_forced)
        if program.calls_possible and fmt.detector:
            from sglang.srt.function_call.function_call_parser import FunctionCallParser

            self._tools = _sglang_tools(program.tools)
            self._fcp = FunctionCallParser(self._tools, fmt.detector)

    # ------------------------------------------------------------------ public
    def feed(self, text_delta: str) -> list[Event]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        return self._after_eot(text_delta, final=False)

    def finish(self) -> list[Event]:
        if self._finished:
            return []
        events = self._after_eot("", final=True)
        self._finished = True
        if self._reasoning is not None:
            reasoning, normal = self._reasoning.parse_stream_end()
            if reasoning:
                events.append(ReasoningDelta(reasoning))
            if normal:
                events += self._normal(normal)
        if self._fcp is None:
            return events + self._required_check()
        events += self._normal("", final=True)
        if self._fcp is None:  # the held lead turned out to be text
            return events + self._required_check()
        with _sglang_parse_errors_quiet():
            text, calls = self._fcp.parse_stream_end()
        events += self._detector_output(text, calls)
        events += self._cross_check()
        for index, call in sorted(self._calls.items()):
            if index not in self._emitted and not call.done:
                events.append(InvalidOutput(f"tool call {index} ({call.name or 'unnamed'}) is incomplete: {call.args!r}"))
        return events + self._required_check()

    def _required_check(self) -> list[Event]:
        if self.program.mode in ("required", "named") and self._n_ok == 0:
            return [InvalidOutput(f"tool_choice {self.program.mode!r} but the output holds no valid call")]
        return []

    def holding(self) -> bool:
        """True while the parser holds output text it has passed on neither as text nor as a
        complete call: a partial end-of-turn text or marker, an undecided lead, a call in
        progress, a detector's buffer. (Whitespace after a call is not held: it is a separator,
        dropped by design.) What a caller may keep of a stopped turn is what came before."""
        if self._hold or self._marker_hold or self._lead or self._run_hold:
            return True
        if any(not c.done and i not in self._emitted for i, c in self._calls.items()):
            return True
        for part in (self._fcp, self._reasoning):
            detector = getattr(part, "detector", None)
            if detector is not None and getattr(detector, "_buffer", None):
                return True
        return False

    # ------------------------------------------------------------------ stages
    def _after_eot(self, delta: str, *, final: bool) -> list[Event]:
        text = self._hold + delta
        for eot in self._eot_texts:
            text = text.replace(eot, "")
        self._hold = ""
        if not final:
            for eot in self._eot_texts:
                for k in range(min(len(eot) - 1, len(text)), 0, -1):
                    if eot.startswith(text[-k:]):
                        self._hold, text = text[-k:], text[:-k]
                        break
                if self._hold:
                    break
        if not text:
            return []
        if self._reasoning is None or self._answer_started:
            return self._normal(text)
        # Like the tool-call detectors, SGLang's reasoning detectors are written for token-sized
        # pieces: fed one character at a time (special-token markers whole) their split does not
        # depend on the chunking. Consecutive pieces of one kind are passed on together.
        events: list[Event] = []
        reasoning_run, normal_run = "", ""
        pieces = self._pieces(text)
        for i, piece in enumerate(pieces):
            if self._answer_started:
                normal_run += "".join(pieces[i:])
                break
            reasoning, normal = self._reasoning.parse_stream_chunk(piece)
            if reasoning:
                if normal_run:
                    events += self._normal(normal_run)
                    normal_run = ""
                reasoning_run += reasoning
            if normal:
                if reasoning_run:
                    events.append(ReasoningDelta(reasoning_run))
                    reasoning_run = ""
                normal_run += normal
                if normal.strip():
                    self._answer_started = True
        if reasoning_run:
            events.append(ReasoningDelta(reasoning_run))
        if normal_run:
            events += self._normal(normal_run)
        return events

    def _normal(self, text: str, *, final: bool = False) -> list[Event]:
        if self._lead is not None and self._fcp is not None:
            text, self._lead = self._lead + text, ""
            starts = (self.program.fmt.call_trigger or "",) + self.program.fmt.atomic_markers
            head = text.lstrip()
            if not final and any(m.startswith(head) for m in starts):
                self._lead = text  # still undecided
                return []
            self._lead = None
            if not any(head.startswith(m) for m in starts):
                self._fcp = None  # the message opens with text: it holds no call (see __init__)
        self._raw += text
        if self._fcp is None:
            return [TextDelta(text)] if text else []
        text, self._marker_hold = self._marker_hold + text, ""
        if not final:  # a marker cut in two by the caller's chunking is fed whole next time
            for marker in self.program.fmt.atomic_markers:
                for k in range(min(len(marker) - 1, len(text)), 0, -1):
                    if marker.startswith(text[-k:]):
                        text, self._marker_hold = text[:-k], text[-k:]
                        break
                if self._marker_hold:
                    break
        # SGLang's detectors advance one step per call and are written for token-sized pieces:
        # given a larger chunk, some leave part of it in their buffer or leak a closing tag as
        # text. Feeding them one piece at a time (a structural character, a special-token marker
        # whole, or a run of other characters) makes the result independent of how the output
        # was chunked. Inside a call, a trailing run is kept until what follows it arrives, so a
        # long argument is fed in a few pieces, not one per token (each feed re-parses the
        # detector's whole buffer).
        text, self._run_hold = self._run_hold + text, ""
        pieces = self._pieces(text)
        if not final and pieces and self._plain(pieces[-1]) and self._in_call():
            self._run_hold = pieces.pop()
        events: list[Event] = []
        for piece in pieces:
            out_text, calls = self._fcp.parse_stream_chunk(piece)
            if out_text or calls:
                events += self._detector_output(out_text, calls)
        return self._merge_text(events)

    def _plain(self, piece: str) -> bool:
        return piece not in self.program.fmt.atomic_markers and not self._special.fullmatch(piece)

    def _in_call(self) -> bool:
        """The detector holds the start of a call (its buffer is the call so far)."""
        detector = getattr(self._fcp, "detector", None)
        return bool(getattr(detector, "_buffer", ""))

    def _pieces(self, text: str) -> list[str]:
        if self._markers is None:
            return self._runs.findall(text)
        pieces: list[str] = []
        for part in self._markers.split(text):
            if part in self.program.fmt.atomic_markers:
                pieces.append(part)
            else:
                pieces.extend(self._runs.findall(part))
        return pieces

    @staticmethod
    def _merge_text(events: list[Event]) -> list[Event]:
        merged: list[Event] = []
        for e in events:
            if isinstance(e, TextDelta) and merged and isinstance(merged[-1], TextDelta):
                merged[-1] = TextDelta(merged[-1].text + e.text)
            else:
                merged.append(e)
        return merged

    def _detector_output(self, text: str, calls: list[Any]) -> list[Event]:
        events: list[Event] = []
        if text:
            if self._calls:
                # After a call only separators may come (the constraint says so); keep
                # whitespace back and let real text through (unconstrained output).
                pending = self._ws_after_call + text
                if pending.strip():
                    events.append(TextDelta(pending))
                    self._ws_after_call = ""
                else:
                    self._ws_after_call = pending
            else:
                events.append(TextDelta(text))
        for item in calls:
            call = self._calls.setdefault(item.tool_index, _Call())
            if item.name:
                call.name = item.name
            call.args += item.parameters or ""
        for index, call in sorted(self._calls.items()):
            if call.done or index in self._emitted or call.name is None:
                continue
            try:
                args = json.loads(call.args)
            except ValueError:
                continue
            if isinstance(args, dict):
                call.done = True
                events.append(self._emit(index, call.name, args))
        return events

    def _cross_check(self) -> list[Event]:
        trigger = self.program.fmt.call_trigger
        if trigger and self._raw.count(trigger) <= len(self._calls):
            return []  # streaming saw every call there is (complete or not)
        from sglang.srt.function_call.function_call_parser import FunctionCallParser

        with _sglang_parse_errors_quiet():
            _, calls = FunctionCallParser(self._tools, self.program.fmt.detector).parse_non_stream(self._raw)
        events: list[Event] = []
        for index, item in enumerate(calls):
            if index in self._emitted:
                continue
            try:
                args = json.loads(item.parameters or "{}")
            except ValueError:
                continue
            if isinstance(args, dict) and item.name:
                self._calls.setdefault(index, _Call(name=item.name, args=item.parameters)).done = True
                events.append(self._emit(index, item.name, args))
        return events

    def _emit(self, index: int, name: str, arguments: dict) -> Event:
        self._emitted.add(index)
        program = self.program
        if name not in program.tool_names:
            return InvalidOutput(f"tool call {index} names an unknown tool {name!r}")
        if program.named is not None and name != program.named:
            return InvalidOutput(f"tool call {index} calls {name!r}, but tool_choice names {program.named!r}")
        if program.max_calls is not None and self._n_ok >= program.max_calls:
            return InvalidOutput(f"tool call {index} exceeds the {program.max_calls} call(s) this turn allows")
        tool = program.tools[program.tool_names.index(name)]
        errors = validate_arguments(tool, arguments)
        if errors:
            return InvalidOutput(f"tool call {index} to {name!r}: arguments do not match the schema: {'; '.join(errors)}")
        self._n_ok += 1
        return ToolCallEvent(name=name, arguments=arguments, index=index)
