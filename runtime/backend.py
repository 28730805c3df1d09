"""The generation backend seam: what the runtime needs from an engine, and nothing more.

The embedded SGLang Engine (runtime.engine) is the default; remote SGLang servers and
OpenAI-compatible servers implement the same interface (runtime.remote). Everything above
this seam (sessions, the tool-call program, the protocol) works in token ids and text and
does not know which backend runs.

Errors raised by a backend, for the layers above:
    BackendError                    base: the request failed inside the backend
    ├── BackendUnavailable          not started, restarting, or its process died (-32004)
    └── BackendOverloaded           queue full; retry later (-32000, retry_after_ms)
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, AsyncIterator


class BackendError(RuntimeError):
    pass


class BackendUnavailable(BackendError):
    pass


class BackendOverloaded(BackendError):
    def __init__(self, message: str, *, retry_after_ms: int = 1000):
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


@dataclass(frozen=True)
class Constraint:
    """A decoding constraint in SGLang's vocabulary.

    kind: 'json_schema' | 'ebnf' | 'regex' | 'structural_tag'; value: the string SGLang takes.
    """

    kind: str
    value: str


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
    """One streamed step. `text` and `output_ids` are cumulative for the request."""

    text: str
    output_ids: list[int]
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finish_reason: str | None = None  # 'stop' | 'length' | 'abort' | None while running
    matched_stop: int | str | None = None


@dataclass(frozen=True)
class BackendInfo:
    name: str  # 'embedded' | 'sglang' | 'openai'
    model: str
    device: str
    dtype: str
    attention_backend: str
    context_length: int
    kv_capacity_tokens: int
    radix_cache: bool
    extra: dict[str, Any] = field(default_factory=dict)


class Backend(abc.ABC):
    """Lifecycle: start() once (may take long; is_ready() tells), stream() many, stop() once."""

    # Capability: True when the backend takes token ids (stream()); False for a chat-level
    # backend (runtime.remote.OpenAIBackend: chat() with messages), which the service drives
    # through its separate chat path.
    token_level: bool = True

    @property
    @abc.abstractmethod
    def info(self) -> BackendInfo: ...

    @property
    @abc.abstractmethod
    def tokenizer(self) -> Any:
        """A Hugging Face tokenizer of the served model (encode/decode/chat template)."""

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @abc.abstractmethod
    def is_ready(self) -> bool: ...

    @abc.abstractmethod
    def stream(self, request: GenRequest) -> AsyncIterator[GenUpdate]:
        """Generate; cancelling the consuming task (or abort(rid)) frees the engine slot."""

    @abc.abstractmethod
    async def abort(self, rid: str) -> None: ...

    def inflight(self) -> int:
        return 0

    async def engine_requests(self) -> int | None:
        """Requests the engine itself holds (running + queued), when it can tell; for tests."""
        return None
