"""Per-turn records, the theoretical maximum hit rate, aggregation, and peak-memory sampling."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class TurnRecord:
    session: int
    turn: int  # 1-based turn index within the session
    agent: int
    input_kind: str  # "user" | "tool"
    tool_choice: str  # "required" | "auto" | "none" | "named"
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float = 0.0
    e2e_ms: float = 0.0
    t_start: float = 0.0  # seconds since the mode started
    t_end: float = 0.0
    finish_reason: str = ""
    tool_calls: int = 0
    theoretical_cached: int = 0
    error: str | None = None
    # Token ids when the mode knows them (not serialized; the theoretical and hf replay use them).
    prompt_ids: list[int] | None = field(default=None, repr=False)
    output_ids: list[int] | None = field(default=None, repr=False)
    new_messages: list[dict[str, Any]] | None = field(default=None, repr=False)  # the turn's input messages

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("prompt_ids", "output_ids", "new_messages"):
            d.pop(key)
        return d


def _lcp(a: np.ndarray, b: np.ndarray) -> int:
    m = min(len(a), len(b))
    if m == 0:
        return 0
    eq = a[:m] == b[:m]
    if eq.all():
        return m
    return int(np.argmin(eq))


def fill_theoretical(records: list[TurnRecord], agent_prefixes: dict[int, list[int]]) -> None:
    """Set each record's `theoretical_cached`: the longest prefix of its prompt that anything
    computed before could serve. "Before" is: the session's agent prefix (system prompt + tools,
    which sessions of one agent share), and prompt + output of every turn issued earlier in this
    mode's run (earlier turns of the same session, and other sessions' turns). Needs
    `prompt_ids` and `output_ids` on every record."""
    prefixes = {g: np.asarray(ids, dtype=np.int64) for g, ids in agent_prefixes.items()}
    done: list[np.ndarray] = []
    for r in sorted(records, key=lambda r: (r.t_start, r.session, r.turn)):
        if r.prompt_ids is None:
            continue
        p = np.asarray(r.prompt_ids, dtype=np.int64)
        best = _lcp(p, prefixes[r.agent]) if r.agent in prefixes else 0
        for seq in done:
            if best >= len(p):
                break
            best = max(best, _lcp(p, seq))
        r.theoretical_cached = min(best, len(p))
        done.append(np.asarray(list(r.prompt_ids) + list(r.output_ids or []), dtype=np.int64))


def pct(values: Iterable[float], q: float) -> float | None:
    v = [x for x in values if x is not None]
    if not v:
        return None
    return float(np.percentile(np.asarray(v, dtype=float), q))


def aggregate(records: list[TurnRecord], *, wall_s: float, peak_rss_bytes: int | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    ok = [r for r in records if r.error is None]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    theoretical = sum(r.theoretical_cached for r in ok)
    out_tokens = sum(r.completion_tokens for r in ok)
    # Turns 2+: what continuing conversations reuse, without the first turns (cold in stateless modes).
    later = [r for r in ok if r.turn > 1]
    later_theoretical = sum(r.theoretical_cached for r in later)
    by_turn: dict[int, dict[str, Any]] = {}
    for t in sorted({r.turn for r in ok}):
        rs = [r for r in ok if r.turn == t]
        by_turn[t] = {
            "n": len(rs),
            "ttft_ms_p50": pct((r.ttft_ms for r in rs), 50),
            "ttft_ms_p95": pct((r.ttft_ms for r in rs), 95),
            "e2e_ms_p50": pct((r.e2e_ms for r in rs), 50),
            "prompt_tokens_mean": prompt_mean(rs),
            "hit_rate": (sum(r.cached_tokens for r in rs) / max(1, sum(r.prompt_tokens for r in rs))),
        }
    finish: dict[str, int] = {}
    for r in records:
        key = r.finish_reason or ("error" if r.error else "")
        finish[key] = finish.get(key, 0) + 1
    result = {
        "turns": len(ok),
        "errors": len(records) - len(ok),
        "error_samples": sorted({r.error for r in records if r.error})[:3],
        "wall_s": wall_s,
        "turns_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / wall_s if wall_s > 0 else 0.0,
        "prompt_tokens": prompt,
        "prompt_tokens_computed": prompt - cached,
        "prompt_tokens_cached": cached,
        "hit_rate": cached / prompt if prompt else 0.0,
        "theoretical_cached_tokens": theoretical,
        "theoretical_hit_rate": theoretical / prompt if prompt else 0.0,
        "hit_vs_theoretical": (cached / theoretical) if theoretical else None,
        "hit_vs_theoretical_after_turn_1": (sum(r.cached_tokens for r in later) / later_theoretical) if later_theoretical else None,
        "ttft_ms_p50": pct((r.ttft_ms for r in ok), 50),
        "ttft_ms_p95": pct((r.ttft_ms for r in ok), 95),
        "e2e_ms_p50": pct((r.e2e_ms for r in ok), 50),
        "e2e_ms_p95": pct((r.e2e_ms for r in ok), 95),
        "ttft_by_turn": by_turn,
        "tool_call_turns": sum(1 for r in ok if r.tool_calls),
        "finish_reasons": finish,
        "peak_rss_mb": (peak_rss_bytes / 2**20) if peak_rss_bytes else None,
    }
    if extra:
        result.update(extra)
    return result


def prompt_mean(rs: list[TurnRecord]) -> float:
    return sum(r.prompt_tokens for r in rs) / len(rs) if rs else 0.0


def add_ratios(modes: dict[str, dict[str, Any]]) -> None:
    """Speed-ups against the baselines: no-radix (same engine, no prefix cache), hf and llamacpp."""
    for base in ("no-radix", "hf", "llamacpp"):
        b = modes.get(base)
        if not b or not b.get("turns"):
            continue
        for m in modes.values():
            m.setdefault("ratios", {})
            m["ratios"][f"turns_per_s_vs_{base}"] = _ratio(m.get("turns_per_s"), b.get("turns_per_s"))
            m["ratios"][f"output_tokens_per_s_vs_{base}"] = _ratio(m.get("output_tokens_per_s"), b.get("output_tokens_per_s"))
            # TTFT: how many times lower (higher is better, like the others)
            m["ratios"][f"ttft_p50_speedup_vs_{base}"] = _ratio(b.get("ttft_ms_p50"), m.get("ttft_ms_p50"))


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


class MemorySampler:
    """Peak RSS of a process and all its descendants, sampled every `interval` seconds."""

    def __init__(self, pid: int | None = None, *, interval: float = 0.2):
        self.pid = pid or os.getpid()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        self.peak = max(self.peak, total)
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="bench-mem", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.sample()


class Clock:
    """Seconds since the mode started (monotonic)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0
