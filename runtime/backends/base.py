"""The backend seam: what the runtime needs from an engine, and nothing more.

Two kinds of backend, two interfaces:

    TokenBackend   takes token ids, streams text and output ids (the embedded SGLang Engine,
                   SGLang servers over HTTP). Sessions are token ids; the runtime renders only
                   each turn's new messages and continues from the exact ids generated.
    ChatBackend    takes OpenAI chat messages (an OpenAI-compatible server): the server renders
                   and parses; a session keeps its history as messages.

Everything above this seam (sessions, the turn, the tool-call program, the protocol) knows the
two interfaces, never a concrete backend; `runtime.backends.make_backend` picks one by name.

Errors raised by a backend, for the layers above (translated once, in runtime.turn):
    BackendError                    base: the request failed inside the backend     (-32603)
    ├── BackendUnavailable          not started, restarting, or its process died    (-32004)
    ├── BackendOverloaded           queue full; retry later                         (-32000)
    └── BackendContextLength        the prompt is longer than the model's context   (-32002)
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from programs import Constraint


class BackendError(RuntimeError):
    pass


class BackendUnavailable(BackendError):
    pass


class BackendOverloaded(BackendError):
    def __init__(self, message: str, *, retry_after_ms: int = 1000):
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class BackendContextLength(BackendError):
    """The server refused the prompt as longer than its context."""

    def __init__(self, message: str, *, prompt_tokens: int = 0, limit: int = 0):
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.limit = limit


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    constraint: Constraint | None = None

    def to_sglang(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            # Token ids are the session's record: keep specials so appended ids stay exact.
            "skip_special_tokens": False,
            "no_stop_trim": True,
        }
        if self.stop:
            params["stop"] = list(self.stop)
        if self.stop_token_ids:
            params["stop_token_ids"] = list(self.stop_token_ids)
        if self.seed is not None:
            params["sampling_seed"] = self.seed
        if self.constraint is not None:
            params[self.constraint.kind] = self.constraint.value
        return params


@dataclass
class GenRequest:
    rid: str
    input_ids: list[int]
    sampling: Sampling


@dataclass
class GenUpdate:
    """One streamed step. `text` and `output_ids` are cumulative for the request; each update
    carries a list of its own (a consumer may keep it without copying)."""

    text: str
    output_ids: list[int]
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finish_reason: str | None = None  # 'stop' | 'length' | 'abort' | None while running
    matched_stop: int | str | None = None


@dataclass
class ChatRequest:
    """One chat-completions call: OpenAI-shaped messages and tools."""

    rid: str
    messages: list[dict[str, Any]]
    max_tokens: int
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class ChatToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the server sent it


@dataclass
class ChatUpdate:
    """One streamed step: deltas, calls completed in this step, and at the end the finish and usage."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[ChatToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    cached_tokens: int = 0
    completion_tokens: int | None = None


@dataclass(frozen=True)
class BackendInfo:
    name: str  # 'embedded' | 'sglang' | 'openai' | 'fake'
    model: str
    device: str
    dtype: str
    attention_backend: str
    context_length: int
    kv_capacity_tokens: int
    radix_cache: bool
    extra: dict[str, Any] = field(default_factory=dict)


class BackendBase(abc.ABC):
    """Lifecycle: start() once (may take long; is_ready() tells), generate many, stop() once.

    A backend whose engine can die and be brought back (the embedded engine) also overrides
    check_alive() and restart(); the server's supervisor calls them.
    """

    @property
    @abc.abstractmethod
    def info(self) -> BackendInfo:
        """Raises BackendUnavailable before start() has finished."""

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @abc.abstractmethod
    def is_ready(self) -> bool: ...

    def inflight(self) -> int:
        return 0

    def supervised(self) -> bool:
        """True when check_alive()/restart() mean something for this backend."""
        return False

    def check_alive(self) -> bool:
        return True

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def engine_requests(self) -> int | None:
        """Requests the engine itself holds (running + queued), when it can tell; for tests."""
        return None


class TokenBackend(BackendBase):
    """Token ids in, cumulative text and output ids out."""

    @property
    @abc.abstractmethod
    def tokenizer(self) -> Any:
        """A Hugging Face tokenizer of the served model (encode/decode/chat template)."""

    @abc.abstractmethod
    def stream(self, request: GenRequest) -> AsyncIterator[GenUpdate]:
        """Generate; cancelling the consuming task (or abort(rid)) frees the engine slot."""

    @abc.abstractmethod
    async def abort(self, rid: str) -> None: ...


class ChatBackend(BackendBase):
    """OpenAI chat messages in, text / reasoning deltas and complete tool calls out."""

    @abc.abstractmethod
    def chat(self, request: ChatRequest) -> AsyncIterator[ChatUpdate]:
        """Generate; cancelling the consuming task closes the request."""


Backend = TokenBackend | ChatBackend
