"""Backends by name (INFERENCE_BACKEND): a registry, not an if/elif chain at call sites."""

from __future__ import annotations

from typing import Callable

from runtime.backend import Backend
from runtime.config import Config


def _embedded(cfg: Config) -> Backend:
    from runtime.engine import EmbeddedBackend

    return EmbeddedBackend(cfg)


def _sglang(cfg: Config) -> Backend:
    from runtime.remote import SGLangBackend

    return SGLangBackend(cfg)


def _openai(cfg: Config) -> Backend:
    from runtime.remote import OpenAIBackend

    return OpenAIBackend(cfg)


BACKENDS: dict[str, Callable[[Config], Backend]] = {
    "embedded": _embedded,
    "sglang": _sglang,
    "openai": _openai,
}


def make_backend(cfg: Config) -> Backend:
    try:
        factory = BACKENDS[cfg.backend]
    except KeyError:
        raise ValueError(f"INFERENCE_BACKEND={cfg.backend!r} is not available; known: {sorted(BACKENDS)}") from None
    return factory(cfg)
