"""Prometheus metrics of the runtime (GET /metrics), in one registry of its own.

A private registry keeps test sessions and embedded uses from colliding with whatever else
registers in prometheus_client's global one.

With the embedded engine, SGLang's own metrics (prefix-cache hit rate, queue length, token
usage, ...) are written by its scheduler processes in prometheus_client's multiprocess mode to
PROMETHEUS_MULTIPROC_DIR; `attach_multiprocess_dir` adds a MultiProcessCollector over that
directory, and /metrics renders both (SGLang's names start with `sglang:`).
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger("runtime.metrics")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("agent_runtime_requests", "JSON-RPC requests by method and outcome", ["method", "outcome"], registry=r)
        self.errors = Counter("agent_runtime_errors", "JSON-RPC errors by code", ["code"], registry=r)
        self.connections_open = Gauge("agent_runtime_connections_open", "WebSocket connections open", registry=r)
        self.sessions_open = Gauge("agent_runtime_sessions_open", "Agent sessions open", registry=r)
        self.generates_inflight = Gauge("agent_runtime_generates_inflight", "generate requests in flight", registry=r)
        self.ttft = Histogram("agent_runtime_ttft_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("agent_runtime_inter_token_seconds", "Mean time between output tokens of a turn",
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("agent_runtime_e2e_seconds", "generate, first byte in to stream_end", buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("agent_runtime_prompt_tokens", "Prompt tokens of finished turns", registry=r)
        self.cached_tokens = Counter("agent_runtime_cached_tokens", "Prompt tokens served from the prefix cache", registry=r)
        self.completion_tokens = Counter("agent_runtime_completion_tokens", "Completion tokens", registry=r)
        self.cache_hit_ratio = Gauge("agent_runtime_prefix_cache_hit_ratio", "cached_tokens / prompt_tokens since start", registry=r)
        self.finish = Counter("agent_runtime_turns", "Turns by finish_reason", ["finish_reason"], registry=r)
        self.continuations = Counter(
            "agent_runtime_stateless_prompts", "Stateless turns with the continuation store on, by lookup: 'exact' "
            "(continued from a recorded turn's ids), 'edited' (minted call ids, changed history), 'none'", ["outcome"], registry=r)
        self.forced_tokens = Counter("agent_runtime_forced_tokens",
                                     "Output tokens the grammar forced at a turn's start, appended to the prompt without a decode "
                                     "step (jump-forward; spans in the middle are the CPU engine scheduler's)", registry=r)
        self.warmup_tokens = Counter("agent_runtime_warmup_prompt_tokens",
                                     "Prompt tokens prefix warm-ups computed (not found in the prefix cache)", registry=r)
        self.invalid_calls = Counter("agent_runtime_invalid_tool_calls", "Tool calls that failed schema validation (never sent)", registry=r)
        self.engine_ready = Gauge("agent_runtime_engine_ready", "1 when the engine serves requests", registry=r)
        self.engine_restarts = Counter("agent_runtime_engine_restarts", "Engine restarts after a failure", registry=r)
        self._prompt_total = 0
        self._cached_total = 0
        self.multiprocess_dir: str | None = None
        self._multiprocess: CollectorRegistry | None = None

    def attach_multiprocess_dir(self, path: str | None) -> None:
        """Render the metrics other processes write to `path` (prometheus_client's multiprocess
        files; SGLang's engine processes) next to the runtime's own; None detaches."""
        from prometheus_client import multiprocess

        if path is None:
            self.multiprocess_dir, self._multiprocess = None, None
            return
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=path)
        self.multiprocess_dir, self._multiprocess = path, registry

    def observe_turn(self, out: Any) -> None:
        self.finish.labels(finish_reason=out.finish_reason).inc()
        if out.error is not None:
            self.errors.labels(code=str(out.error.code)).inc()
        self.prompt_tokens.inc(out.prompt_tokens)
        self.cached_tokens.inc(out.cached_tokens)
        self.completion_tokens.inc(out.completion_tokens)
        self._prompt_total += out.prompt_tokens
        self._cached_total += out.cached_tokens
        if self._prompt_total:
            self.cache_hit_ratio.set(self._cached_total / self._prompt_total)
        if out.completion_tokens and out.ttft_ms is not None:
            self.ttft.observe(out.ttft_ms / 1000)
            if out.completion_tokens > 1:
                self.inter_token.observe((out.total_ms - out.ttft_ms) / 1000 / (out.completion_tokens - 1))
        self.e2e.observe(out.total_ms / 1000)

    def render(self) -> bytes:
        own = generate_latest(self.registry)
        mp = self._multiprocess
        if mp is None:
            return own
        try:
            return own + generate_latest(mp)
        except Exception as exc:  # a file being written or removed under us: the runtime's own still count
            log.warning("could not read the engine's metrics in %s: %s", self.multiprocess_dir, exc)
            return own


METRICS = Metrics()
