"""Prefix warm-ups: an agent's prefix (system prompt + tools) computed once, before the turns
that need it, so every session of that agent finds it in the radix cache.

    warm_prefix(backend, ids)   one prefill of `ids` (a one-token request), watched for a dead engine
    SharedWarmups               one warm-up per prefix at a time: the first session.open or
                                stateless request of an agent prefix warms it, the ones that
                                arrive meanwhile wait for that one warm-up instead of each
                                computing the same prefix (the engine does not merge prefills in
                                flight: eight sessions of two agents opened together computed the
                                2,000-token prefix eight times, docs/BENCHMARKS.md)

Whether the engine still holds a prefix is not remembered here (the radix cache evicts, and can
be flushed): every session.open and every conversation's first stateless request warms its
prefix, which costs one short request when the prefix is still cached.

A session warms its prefix at session.open (runtime.service). A stateless client (the OpenAI
API) has no open: its conversation's first request warms it, through the same SharedWarmups, so
a session and a stateless conversation of one agent share a warm-up too.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable

from protocol import errors as rpc
from runtime.backends.base import BackendError, BackendUnavailable, GenRequest, Sampling, TokenBackend
from runtime.metrics import METRICS

log = logging.getLogger("runtime.warmup")

WARM_POLL_S = 0.1  # how often a warm-up in progress checks that the engine is still there
MIN_SHARED_WARM_TOKENS = 256  # shorter prefixes cost less to compute again than a warm-up's round trip


async def warm_prefix(backend: TokenBackend, prefix: list[int], *, during: str = "session.open") -> None:
    """Compute `prefix` once so the turns that start with it find it cached.

    Warming is an optimisation: an engine error is logged and the caller goes on unwarmed (its
    turn reports any error). An engine that dies meanwhile is -32004, whether its stream fails
    or, as a killed SGLang scheduler does, never returns: the warm-up watches the backend's
    readiness while it waits."""
    req = GenRequest(rid=f"warm-{uuid.uuid4().hex}", input_ids=prefix, sampling=Sampling(max_new_tokens=1))

    async def run() -> None:
        cached = None
        async for u in backend.stream(req):
            cached = u.cached_tokens
        if cached is not None:  # what it computed: the part of the prefix the cache did not hold
            METRICS.warmup_tokens.inc(max(0, len(prefix) - cached))

    task = asyncio.create_task(run())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=WARM_POLL_S)
            if not task.done() and not backend.is_ready():
                raise BackendUnavailable("the engine stopped while it computed the prefix")
        task.result()
    except BackendUnavailable as exc:
        raise rpc.EngineUnavailable(f"the engine became unavailable during {during}: {exc}; retry") from None
    except BackendError as exc:
        log.warning("prefix warm-up failed: %s", exc)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=5)


class SharedWarmups:
    """One warm-up per prefix key at a time, shared by the requests that need it (see module doc)."""

    def __init__(self) -> None:
        self._inflight: dict[bytes, asyncio.Future[None]] = {}
        self.started = 0  # warm-ups run (for tests and metrics)

    async def ensure(self, key: bytes, warm: Callable[[], Awaitable[None]]) -> None:
        """Return once the prefix `key` was warmed, by this call (`warm()`) or by the one in flight.
        A waiter that goes away does not cancel the warm-up the others wait for."""
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(warm())
            self.started += 1
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        await asyncio.shield(task)
