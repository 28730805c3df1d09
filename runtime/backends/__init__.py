"""Backends by name (INFERENCE_BACKEND), behind the seam of runtime.backends.base.

    embedded      runtime.backends.embedded     sglang.Engine in this process (token level)
    sglang        runtime.backends.sglang_http  SGLang servers / sglang-router over HTTP (token level)
    openai        runtime.backends.openai_http  an OpenAI-compatible server (chat level)
    fake          runtime.backends.fake         a scripted backend for tests and demos (token level)

Implementations are imported only when chosen: the service and the front ends import the seam.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from runtime.backends.base import (
    Backend,
    BackendBase,
    BackendContextLength,
    BackendError,
    BackendInfo,
    BackendOverloaded,
    BackendUnavailable,
    ChatBackend,
    ChatRequest,
    ChatToolCall,
    ChatUpdate,
    GenRequest,
    GenUpdate,
    Sampling,
    TokenBackend,
)
from runtime.config import Config

__all__ = [
    "BACKENDS", "Backend", "BackendBase", "BackendContextLength", "BackendError", "BackendInfo", "BackendOverloaded",
    "BackendUnavailable", "ChatBackend", "ChatRequest", "ChatToolCall", "ChatUpdate", "GenRequest", "GenUpdate",
    "Sampling", "TokenBackend", "make_backend",
]

# name -> "module:class"; each class takes the Config.
BACKENDS: dict[str, str] = {
    "embedded": "runtime.backends.embedded:EmbeddedBackend",
    "sglang": "runtime.backends.sglang_http:SGLangBackend",
    "openai": "runtime.backends.openai_http:OpenAIBackend",
    "fake": "runtime.backends.fake:FakeBackend",
}


def make_backend(cfg: Config) -> Backend:
    try:
        target = BACKENDS[cfg.backend]
    except KeyError:
        raise ValueError(f"INFERENCE_BACKEND={cfg.backend!r} is not available; known: {sorted(BACKENDS)}") from None
    module, _, name = target.partition(":")
    factory: Callable[[Config], Backend] = getattr(importlib.import_module(module), name)
    return factory(cfg)
