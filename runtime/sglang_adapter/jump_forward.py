"""Jump-forward over the text a request's grammar forces in the middle of its output (CPU engine).

A tool call's grammar forces whole spans after the model's choices: the closing of a string and
the next key the schema requires (`","units":"`), the closing of the arguments and of the call
(`"}}</tool_call>`). Decoded, each forced token is a model step. SGLang 0.5.23's scheduler no
longer jumps over them (its grammar objects still find the spans: `try_jump_forward`).

`Scheduler.process_batch_result` gets an AFTER hook (runtime.sglang_adapter.plugin). After a
decode step, each request of the running batch whose grammar now forces text is looked at:
- the forced text is tokenized with the engine's tokenizer and fed to the request's grammar
  token by token; a token the grammar refuses rolls the span back (nothing is forced);
- the last of those tokens is left to the model: how the forced text's end is best tokenized
  depends on what follows it (SmolLM2's tokenizer writes `"}` as one token, `"}}` as `"` and `}}`);
- what remains must be at least `min_span` tokens: unless a prefill runs next anyway, the span
  costs one extend pass that the other requests of the batch wait for, and saves one decode step
  per forced token for this request only (docs/BENCHMARKS.md, "Tenth round");
- the request leaves the running batch the way SGLang retracts one, except that its KV is first
  put into the radix tree (release_kv_cache with checkpoint): its forced tokens are appended to
  its output, it is queued again, and the next prefill computes only those tokens and the one
  the model chose last, then samples the next token under the grammar; it then decodes on with
  the rest of the batch.
Forced tokens are output tokens like the others (streamed, counted in completion_tokens); a
retracted request's prompt is not counted as cached tokens again (SGLang's `retracted_stain`).
A jumped span is the tokenizer's spelling of the text, not necessarily the model's (which spells
forced names in short pieces under the grammar), so greedy output can differ from the same
request with the span decoded, and with the batch it ran in (which spans are worth a jump); the
grammar keeps every output valid either way.

It runs only where it is safe and pays: a radix cache (without one, the queued request would
compute its whole context again), the overlap scheduler off (runtime.backends.embedded turns it off
on CPU engines when this is on: the next decode step would already hold the request), no
speculative decoding, and never for a request that returns logprobs, hidden states or sampling
masks, has stop strings, or would run within two tokens of its max_new_tokens.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

ENV = "AGENT_RUNTIME_JUMP_FORWARD"  # "on" (default) or "off"
TARGET = "sglang.srt.managers.scheduler.Scheduler.process_batch_result"
KEY = "jump_forward"  # in the scheduler's internal state: STATS
# spans and tokens jumped; spans the grammar refused in the tokenizer's spelling; looks at a span
# too short for its batch (once per step while it lasts); hook failures (the spans were decoded)
STATS: dict[str, Any] = {"spans": 0, "tokens": 0, "refused": 0, "short": 0, "errors": 0}


def active() -> bool:
    return os.environ.get("SGLANG_USE_CPU_ENGINE", "").lower() in ("1", "true") and \
        os.environ.get(ENV, "on") != "off"


def min_span(batch_size: int, prefill_pending: bool = False) -> int:
    """The fewest forced tokens worth a jump for a request of a running batch of this size.

    The span's extend pass is a step of its own that the batch waits for, unless a prefill runs
    next anyway (requests are waiting): then the span rides in that pass almost for free. Else,
    over a batch of B sessions a jump of k tokens saves k decode steps of the batch for one
    request and costs every request one extend pass, so it pays when k * step(B) > B * extend.
    Measured on 2 AVX2 cores (2k-3k contexts): step(B) = 57, 65, 87, 97, 109, 108, 124, 124 ms
    for B = 1..8, a forced span's extend 74-87 ms; 2 + B // 2 follows that bound."""
    if prefill_pending:
        return 1
    return 2 + batch_size // 2


def after_result(result: Any, scheduler: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        if (batch is not None and batch.forward_mode.is_decode() and batch is scheduler.running_batch
                and not scheduler.enable_overlap and batch.spec_algorithm.is_none() and scheduler.tokenizer is not None
                and scheduler.tree_cache.supports_prefix_sharing()):
            _jump(scheduler, batch)
    except Exception:  # never the scheduler's failure: the request decodes its span instead
        STATS["errors"] += 1
        log.exception("jump-forward skipped")
    return result


def _eligible(req: Any) -> bool:
    if (req.grammar is None or req.finished() or getattr(req, "to_finish", None) is not None or req.is_retracted
            or req.beam_group is not None):
        return False
    if req.return_logprob or req.return_hidden_states or getattr(req, "return_sampling_mask", False):
        return False
    return not req.sampling_params.stop_strs


def _span(scheduler: Any, req: Any) -> list[int]:
    """The tokens of the text this request's grammar forces now, less the last (the model's), or
    [] when there is none or it would run within two tokens of max_new_tokens."""
    grammar = req.grammar
    helper = grammar.try_jump_forward(scheduler.tokenizer)
    if not helper:
        return []
    text = grammar.jump_forward_str_state(helper)[0]
    ids = list(scheduler.tokenizer.encode(text, add_special_tokens=False))[:-1]
    limit = req.sampling_params.max_new_tokens
    room = (limit if limit is not None else 1 << 30) - len(req.output_ids) - 2
    return ids if len(ids) <= room else []


def _accepted(grammar: Any, ids: list[int]) -> bool:
    """Feed the span to the request's grammar; on a token it refuses (the canonical tokenization
    is not one it takes there), roll back what it took and say so."""
    accepted = 0
    try:
        for token in ids:
            grammar.accept_token(token)
            accepted += 1
    except Exception:  # xgrammar's refusal is a ValueError; anything else leaves the span to the model too
        pass
    if accepted < len(ids):
        if accepted:
            grammar.rollback(accepted)
        STATS["refused"] += 1
        return False
    return True


def _jump(scheduler: Any, batch: Any) -> None:
    from sglang.srt.mem_cache.common import release_kv_cache

    size = len(batch.reqs)
    spans = [(req, ids) for req in batch.reqs if _eligible(req) for ids in [_span(scheduler, req)] if ids]
    if not spans:
        return
    # once one span is worth its pass (or a prefill runs next anyway), the others ride in it
    pending = bool(scheduler.waiting_queue) or any(len(ids) >= min_span(size) for _, ids in spans)
    least = min_span(size, pending)
    STATS["short"] += sum(len(ids) < least for _, ids in spans)
    moved = [(req, ids) for req, ids in spans if len(ids) >= least and _accepted(req.grammar, ids)]
    if not moved:
        return
    batch.filter_batch(reqs_to_exclude=[req for req, _ in moved])
    batch.batch_is_full = False
    for req, ids in moved:
        release_kv_cache(req, scheduler.tree_cache, checkpoint=True)
        req.reset_for_retract()
        req.output_ids.extend(ids)
        scheduler._add_request_to_queue(req, is_retracted=True)
        STATS["spans"] += 1
        STATS["tokens"] += len(ids)
