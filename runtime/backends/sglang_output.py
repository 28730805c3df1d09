"""SGLang's streamed output dicts (Engine.async_generate and HTTP /generate alike) as GenUpdates."""

from __future__ import annotations

from typing import Any

from runtime.backends.base import GenUpdate

_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


def to_update(out: dict[str, Any]) -> GenUpdate:
    meta = out.get("meta_info", {})
    finish = meta.get("finish_reason")
    reason = matched = None
    if finish:
        reason = _FINISH.get(finish.get("type"), "abort")
        matched = finish.get("matched")
    return GenUpdate(
        text=out.get("text", ""),
        output_ids=list(out.get("output_ids") or []),
        prompt_tokens=int(meta.get("prompt_tokens", 0)),
        cached_tokens=int(meta.get("cached_tokens", 0) or 0),
        completion_tokens=int(meta.get("completion_tokens", 0)),
        finish_reason=reason,
        matched_stop=matched,
    )
