"""This project's SGLang plugin (entry point group `sglang.srt.plugins`, see pyproject.toml).

SGLang loads general plugins at the start of each of its processes (its scheduler included),
so this is how code reaches the engine's own processes. On a CPU engine
(SGLANG_USE_CPU_ENGINE=1, set by runtime.sglang_adapter.prepare) it:

- replaces the `torch_native` attention backend class with
  runtime.sglang_adapter.cpu_attention.PrefixSDPABackend, unless AGENT_RUNTIME_CPU_ATTENTION=sglang
  (runtime.backends.embedded sets that for INFERENCE_ATTN_IMPLEMENTATION=sdpa or eager);
- adds `attention_backend_class` (the class the scheduler's model runner really holds) to the
  scheduler's internal state, which runtime.backends.embedded reads back at start and reports.

Elsewhere (CUDA engines, other SGLang users of this environment) it does nothing.
"""

from __future__ import annotations

import os
from typing import Any

ENV = "AGENT_RUNTIME_CPU_ATTENTION"  # "prefix-sdpa" (default) or "sglang"
BACKEND_TARGET = "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend"
STATE_TARGET = "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController.get_internal_state"
STATE_KEY = "attention_backend_class"


def cpu_engine() -> bool:
    return os.environ.get("SGLANG_USE_CPU_ENGINE", "").lower() in ("1", "true")


def active() -> bool:
    return cpu_engine() and os.environ.get(ENV, "prefix-sdpa") != "sglang"


def _report_attention(result: Any, state: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        backend = state.scheduler.tp_worker.model_runner.attn_backend
        result.internal_state[STATE_KEY] = f"{type(backend).__module__}.{type(backend).__qualname__}"
    except Exception:  # a report, never a failure of the scheduler's own call
        pass
    return result


def load() -> None:
    if not cpu_engine():
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(STATE_TARGET, _report_attention, HookType.AFTER)
    if active():
        from runtime.sglang_adapter.cpu_attention import PrefixSDPABackend

        HookRegistry.register(BACKEND_TARGET, PrefixSDPABackend, HookType.REPLACE)
