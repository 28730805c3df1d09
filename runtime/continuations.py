"""Exact tokens for stateless requests: a history this runtime produced, re-sent whole by a
client, continues from the token ids the model generated, not from a re-rendering.

A stateless client (the OpenAI API, a /ws generate without session_id) sends the whole
history every turn. Rendering it again gives other tokens than the model wrote whenever the
client changed the text on the way back: tool-call arguments re-serialized (LangChain runs
`json.dumps`: other spaces, another key order), reasoning dropped, a different split of the
same text. The engine's prefix cache then misses from the first token that differs.

So every stateless turn that ends with output the client received is recorded here: its
prompt ids plus its output ids, under a digest of its history *as the client will re-send
it*, loosely normalized:

    roles               developer counts as system
    contents            surrounding whitespace ignored, null the same as ""
    tool calls          call id, name, arguments compared as JSON values (key order and
                        spaces ignored)
    reasoning           not part of the history (the client may drop it)
    system prompt and tools  the digest starts from them (canonical tools)

A new request's history is looked up at each of its assistant messages, deepest first, by
the digest of the whole normalized history up to that message: a turn matches only when
everything before it, and its reply, are what the runtime recorded. The call ids this runtime
minted are indexed too: a history that carries them but no longer verifies was edited by the
client (counted apart in agent_runtime_stateless_prompts_total{outcome="edited"}). The deepest turn that verifies gives the
prompt `its ids + the messages after it` (rendered exactly as a session renders a new turn),
so the model sees the tokens it generated and `cached_tokens` covers everything before the
new messages. No match (a history edited by the client, produced by another model, or
forgotten) renders in full, as before: the result is correct either way, only the cache
differs.

Bounded per API key (owner): least recently used first out beyond `max_bytes` (ids are kept
as 32-bit integers, 4 bytes a token) and after `ttl_s` unused. An owner never matches another
owner's turns (each has its own table).
"""

from __future__ import annotations

import array
import asyncio
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from runtime.metrics import METRICS
from runtime.prompts import rendered

if TYPE_CHECKING:
    import programs
    from runtime.turn import TurnOutcome

ENTRY_OVERHEAD_BYTES = 256  # what one entry costs besides its ids (digests, call ids, bookkeeping)


def _canonical(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def normalized(message: dict[str, Any]) -> list[Any]:
    """A message as the matching compares it (see the module docstring)."""
    role = "system" if message.get("role") == "developer" else message.get("role")
    content = (message.get("content") or "").strip()
    if role == "assistant":
        calls = [[c.get("call_id") or "", c.get("name") or "", c.get("arguments") or {}]
                 for c in message.get("tool_calls") or []]
        return [role, content, calls]
    if role == "tool":
        return [role, content, message.get("tool_call_id") or ""]
    return [role, content]


class HistoryDigest:
    """The running digest of a normalized history: the system prompt and tools, then each
    message in turn. `at(i)` is the digest of everything up to and including message i."""

    def __init__(self, system_prompt: str | None, tools: list[dict[str, Any]]):
        self._hash = hashlib.sha256(_canonical([(system_prompt or "").strip(), tools]).encode("utf-8", "surrogatepass"))

    def add(self, message: dict[str, Any]) -> bytes:
        data = _canonical(normalized(message)).encode("utf-8", "surrogatepass")
        self._hash.update(len(data).to_bytes(8, "little"))
        self._hash.update(data)
        return self._hash.digest()

    def copy(self) -> HistoryDigest:
        other = HistoryDigest.__new__(HistoryDigest)
        other._hash = self._hash.copy()
        return other


@dataclass(frozen=True)
class Candidate:
    """An assistant message of a request's history that may be a turn this runtime produced."""

    index: int  # its index in the messages
    digest: bytes  # the digest of the history up to and including it
    call_ids: tuple[str, ...]


def candidates(system_prompt: str | None, tools: list[dict[str, Any]], messages: list[dict[str, Any]]) -> tuple[list[Candidate], HistoryDigest]:
    """The request's assistant messages, deepest first, and the digest of its whole history
    (what the reply's digest continues). Linear in the history's size: run it off the event loop."""
    digest = HistoryDigest(system_prompt, tools)
    found: list[Candidate] = []
    for i, m in enumerate(messages):
        d = digest.add(m)
        if m.get("role") == "assistant":
            found.append(Candidate(i, d, tuple(c.get("call_id") or "" for c in m.get("tool_calls") or [])))
    found.reverse()
    return found, digest


@dataclass
class Continuation:
    """A recorded turn: the ids the engine was given plus the ids it generated."""

    ids: array.array[int]
    open_turn: bool  # the output did not end with an end-of-turn token
    call_ids: tuple[str, ...]
    used: float = field(default_factory=time.monotonic)

    @property
    def size(self) -> int:
        return ENTRY_OVERHEAD_BYTES + self.ids.itemsize * len(self.ids) + sum(len(c) for c in self.call_ids)


class _Table:
    """One owner's recorded turns, least recently used first."""

    def __init__(self) -> None:
        self.entries: OrderedDict[bytes, Continuation] = OrderedDict()
        self.by_call: dict[str, bytes] = {}
        self.bytes = 0

    def drop(self, digest: bytes) -> None:
        entry = self.entries.pop(digest)
        self.bytes -= entry.size
        for call_id in entry.call_ids:
            if self.by_call.get(call_id) == digest:
                del self.by_call[call_id]


class ContinuationStore:
    def __init__(self, *, max_bytes: int, ttl_s: float):
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._tables: dict[str, _Table] = {}

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def used_bytes(self, owner: str) -> int:
        table = self._tables.get(owner)
        return 0 if table is None else table.bytes

    def __len__(self) -> int:
        return sum(len(t.entries) for t in self._tables.values())

    def record(self, owner: str, digest: bytes, ids: list[int], *, open_turn: bool, call_ids: tuple[str, ...]) -> None:
        """Keep a turn the client received: `digest` is its history's including its reply."""
        if not self.enabled:
            return
        entry = Continuation(array.array("i", ids), open_turn, call_ids)
        if entry.size > self.max_bytes:
            return
        table = self._tables.setdefault(owner, _Table())
        if digest in table.entries:
            table.drop(digest)
        table.entries[digest] = entry
        table.bytes += entry.size
        for call_id in call_ids:
            table.by_call[call_id] = digest
        self._expire(table)
        while table.bytes > self.max_bytes:
            table.drop(next(iter(table.entries)))

    def lookup(self, owner: str, found: list[Candidate]) -> tuple[str, tuple[Candidate, Continuation] | None]:
        """The deepest candidate that verifies against a recorded turn of `owner` (the recorded
        turn's digest is this history's up to the candidate), with the outcome: 'exact'; 'edited'
        (a call id this runtime minted is there, but the history around it changed); 'none'."""
        table = self._tables.get(owner)
        if table is None:
            return "none", None
        self._expire(table)
        for cand in found:
            entry = table.entries.get(cand.digest)
            if entry is not None:
                entry.used = time.monotonic()
                table.entries.move_to_end(cand.digest)
                return "exact", (cand, entry)
        edited = any(c in table.by_call for cand in found for c in cand.call_ids)
        return ("edited" if edited else "none"), None

    def _expire(self, table: _Table) -> None:
        now = time.monotonic()
        while table.entries:
            digest, oldest = next(iter(table.entries.items()))
            if now - oldest.used <= self.ttl_s:
                break
            table.drop(digest)


def open_turn(renderer: programs.Renderer, output_ids: list[int]) -> bool:
    """The output did not end with an end-of-turn token (the next turn closes it first)."""
    return not (output_ids and output_ids[-1] in renderer.stop_token_ids)


async def stateless_prompt(store: ContinuationStore, renderer: programs.Renderer, owner: str, system: str | None,
                           tools: list[dict[str, Any]], messages: list[dict[str, Any]],
                           ) -> tuple[list[int], Callable[[TurnOutcome], None] | None, bool]:
    """A stateless turn's prompt, continued from the exact ids of the deepest earlier turn of
    this history the store holds, else rendered in full; and how to record this turn once the
    client has its output (None: the store is off); and whether it continued a recorded turn. Digests, rendering and tokenizing run in
    worker threads, off the event loop."""
    if not store.enabled:
        return await asyncio.to_thread(rendered, renderer.full_ids, system, tools, messages), None, False
    found, digest = await asyncio.to_thread(candidates, system, tools, messages)
    outcome, hit = store.lookup(owner, found)
    if hit is None:
        prompt = await asyncio.to_thread(rendered, renderer.full_ids, system, tools, messages)
    else:
        cand, entry = hit
        tail = await asyncio.to_thread(rendered, renderer.tail_ids, messages[cand.index + 1:], close_previous=entry.open_turn)
        prompt = entry.ids.tolist() + tail
    METRICS.continuations.labels(outcome=outcome).inc()

    def record(out: TurnOutcome) -> None:
        if out.output_ids:
            key = digest.add({"role": "assistant", "content": out.text, "tool_calls": out.tool_calls})
            store.record(owner, key, prompt + out.output_ids, open_turn=open_turn(renderer, out.output_ids),
                         call_ids=tuple(c["call_id"] for c in out.tool_calls))

    return prompt, record, hit is not None
