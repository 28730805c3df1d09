"""The `hf` mode: in-process transformers `generate`, no prefix reuse (the stack this replaces).

It replays a reference mode's token ids (engine, else no-radix, else rerender): each turn's
prompt is exactly the reference turn's prompt ids, and generation is greedy with
min_new_tokens = max_new_tokens = the reference turn's completion tokens, so hf computes the
same prompts and writes the same number of tokens as the engine did (its tokens themselves
are not used: the next prompt is the reference's). Sessions run C at a time like the other
modes, but a single model serves one request at a time behind a lock (as an in-process
transformers server does), so TTFT includes the wait for the lock. No KV cache survives a
turn: every turn prefills its whole prompt.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

from bench.metrics import Clock, TurnRecord


class _FirstToken:
    """A generate() streamer that notes when the first new token arrives."""

    def __init__(self) -> None:
        self.prompt_seen = False
        self.first: float | None = None

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() puts the prompt first
            self.prompt_seen = True
            return
        if self.first is None:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def load_model(model_path: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    model.eval()
    return model


def generate_once(model: Any, prompt_ids: list[int], n: int, pad_id: int) -> tuple[float, float, int]:
    """(perf_counter at the first new token, at the end, tokens written) of one greedy generation."""
    import torch

    streamer = _FirstToken()
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
            streamer=streamer, pad_token_id=pad_id,
        )
    done = time.perf_counter()
    return (streamer.first or done), done, int(out.shape[1] - ids.shape[1])


async def run_replay(
    model: Any,
    reference: list[dict[str, Any]],
    *,
    concurrency: int,
    pad_id: int,
    on_turn: Callable[[TurnRecord], None] | None = None,
) -> tuple[list[TurnRecord], float]:
    """Replay `reference` (dicts with session, turn, agent, input_kind, tool_choice, prompt_ids,
    completion_tokens, theoretical_cached) session by session, C sessions at a time."""
    sessions: dict[int, list[dict]] = {}
    for r in reference:
        sessions.setdefault(r["session"], []).append(r)
    for turns in sessions.values():
        turns.sort(key=lambda r: r["turn"])
    lock = threading.Lock()  # one request at a time on the one model
    clock = Clock()
    sem = asyncio.Semaphore(concurrency)
    records: list[TurnRecord] = []

    def run_locked(prompt: list[int], n: int) -> tuple[float, float, int]:
        with lock:
            return generate_once(model, prompt, n, pad_id)

    async def play(turns: list[dict]) -> None:
        async with sem:
            for r in turns:
                rec = TurnRecord(session=r["session"], turn=r["turn"], agent=r["agent"], input_kind=r["input_kind"],
                                 tool_choice=r["tool_choice"])
                rec.t_start = clock.now()
                n = max(1, int(r["completion_tokens"]))
                asked = time.perf_counter()
                first, _done, wrote = await asyncio.to_thread(run_locked, r["prompt_ids"], n)
                rec.t_end = clock.now()
                rec.prompt_tokens = len(r["prompt_ids"])
                rec.cached_tokens = 0
                rec.completion_tokens = wrote
                rec.ttft_ms = (first - asked) * 1000  # includes the wait for the model
                rec.e2e_ms = (rec.t_end - rec.t_start) * 1000
                rec.finish_reason = "length"
                rec.theoretical_cached = int(r.get("theoretical_cached", 0))
                records.append(rec)
                if on_turn is not None:
                    on_turn(rec)

    await asyncio.gather(*(play(t) for t in sessions.values()))
    return records, clock.now()
