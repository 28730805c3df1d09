"""Agent sessions: the conversation held as token ids, append-only.

A session's `token_ids` is exactly what the engine has computed for it: the prefix (system
prompt + tools), then each turn's new-message tokens and the model's output tokens. Turn N+1
sends `token_ids + new tokens`, so the engine's radix cache serves everything before the new
tokens; nothing is re-rendered. Sessions with the same agent definition start from the same
prefix ids and therefore share one cached prefix in the engine.

Session ids are unguessable (secrets.token_urlsafe) and belong to the key that opened them; a
session of another owner is reported exactly like a missing one.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Any


class SessionNotFound(LookupError):
    pass


class SessionLimit(RuntimeError):
    pass


class SessionBusy(RuntimeError):
    """A session runs one turn at a time: its next prompt depends on this turn's output."""


@dataclass
class Session:
    id: str
    owner: str
    system_prompt: str | None
    tools: list[dict]
    token_ids: list[int]
    prefix_tokens: int
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    # True when the last assistant output did not end with the end-of-turn token.
    open_turn: bool = False
    pending_calls: dict[str, str] = field(default_factory=dict)  # call_id -> tool name
    call_counter: int = 0
    turns: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    running: asyncio.Event | None = None  # the cancel event of the turn in progress
    messages: list[dict] = field(default_factory=list)  # chat-level backends keep the history as messages

    def next_call_id(self) -> str:
        self.call_counter += 1
        return f"call_{self.id[:8]}_{self.call_counter}"


class SessionStore:
    def __init__(self, *, max_sessions: int, max_per_owner: int, ttl_s: float):
        self._sessions: dict[str, Session] = {}
        self._max = max_sessions
        self._max_per_owner = max_per_owner
        self._ttl = ttl_s

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, *, owner: str, system_prompt: str | None, tools: list[dict], prefix_ids: list[int]) -> Session:
        self.expire()
        if len(self._sessions) >= self._max:
            raise SessionLimit(f"the server holds its maximum of {self._max} sessions; close some first")
        owned = sum(1 for s in self._sessions.values() if s.owner == owner)
        if owned >= self._max_per_owner:
            raise SessionLimit(f"this client holds its maximum of {self._max_per_owner} sessions; close some first")
        sid = "sess_" + secrets.token_urlsafe(18)
        session = Session(
            id=sid,
            owner=owner,
            system_prompt=system_prompt,
            tools=tools,
            token_ids=list(prefix_ids),
            prefix_tokens=len(prefix_ids),
        )
        self._sessions[sid] = session
        return session

    def get(self, session_id: str, *, owner: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None or not secrets.compare_digest(session.owner, owner):
            raise SessionNotFound(session_id)
        if time.monotonic() - session.last_used > self._ttl and not session.lock.locked():
            del self._sessions[session_id]
            raise SessionNotFound(session_id)
        session.last_used = time.monotonic()
        return session

    def close(self, session_id: str, *, owner: str) -> Session:
        session = self.get(session_id, owner=owner)
        del self._sessions[session.id]
        return session

    def expire(self) -> int:
        now = time.monotonic()
        stale = [sid for sid, s in self._sessions.items() if now - s.last_used > self._ttl and not s.lock.locked()]
        for sid in stale:
            del self._sessions[sid]
        return len(stale)

    def stats(self) -> dict[str, Any]:
        return {"open": len(self._sessions)}
