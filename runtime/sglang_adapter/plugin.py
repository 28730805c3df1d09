"""This project's SGLang plugin (entry point group `sglang.srt.plugins`, see pyproject.toml).

SGLang loads general plugins at the start of each of its processes (its scheduler included),
so this is how code reaches the engine's own processes. On a CPU engine
(SGLANG_USE_CPU_ENGINE=1, set by runtime.sglang_adapter.prepare) it:

- replaces the `torch_native` attention backend class with
  runtime.sglang_adapter.cpu_attention.PrefixSDPABackend, unless AGENT_RUNTIME_CPU_ATTENTION=sglang
  (runtime.backends.embedded sets that for INFERENCE_ATTN_IMPLEMENTATION=sdpa or eager);
- runs unquantized bf16 linear layers and the lm_head on weights reordered once for oneDNN
  (runtime.sglang_adapter.cpu_linear), unless AGENT_RUNTIME_CPU_LINEAR=sglang
  (runtime.backends.embedded sets that for INFERENCE_CPU_PACKED_LINEARS=false);
- runs decode steps of SGLang's dense Llama models without its per-layer machinery
  (runtime.sglang_adapter.cpu_decode) where the two above are both on, unless
  AGENT_RUNTIME_CPU_DECODE=sglang (runtime.backends.embedded sets that for
  INFERENCE_CPU_LEAN_DECODE=false);
- has that backend attend decode steps with the compiled kernel of runtime.sglang_adapter.native
  where it can be built, unless AGENT_RUNTIME_CPU_ATTENTION_KERNEL=sdpa (runtime.backends.embedded
  sets that for INFERENCE_CPU_ATTENTION_KERNEL=false);
- has the packed linear layers multiply up to 16 rows (decode steps) with that library's small-M
  GEMM, unless AGENT_RUNTIME_CPU_GEMM_KERNEL=onednn (INFERENCE_CPU_GEMM_KERNEL=false);
- adds `attention_backend_class` (the class the scheduler's model runner really holds) and
  `packed_linear_layers` (how many of its layers run packed weights) and `cpu_decode` (decode
  steps run by the loop, or why the model keeps SGLang's forward) and `cpu_attention_kernel`
  (whether decode attention runs the kernel, else why not, and its calls) and `cpu_gemm_kernel`
  (the same for the small-M GEMM) to the scheduler's internal state, which
  runtime.backends.embedded reads back at start and reports;
- jumps over the text a request's grammar forces in the middle of its output
  (runtime.sglang_adapter.jump_forward), unless AGENT_RUNTIME_JUMP_FORWARD=off
  (runtime.backends.embedded sets that for INFERENCE_JUMP_FORWARD=false); its counts are in the
  internal state under `jump_forward`.

Elsewhere (CUDA engines, other SGLang users of this environment) it does nothing.
"""

from __future__ import annotations

import os
from typing import Any

ENV = "AGENT_RUNTIME_CPU_ATTENTION"  # "prefix-sdpa" (default) or "sglang"
BACKEND_TARGET = "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend"
LINEAR_ENV = "AGENT_RUNTIME_CPU_LINEAR"  # "packed" (default) or "sglang"
LINEAR_METHOD = "sglang.srt.layers.quantization.unquant.UnquantizedLinearMethod"
LM_HEAD_TARGET = "sglang.srt.layers.logits_processor.LogitsProcessor._compute_lm_head"
STATE_TARGET = "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController.get_internal_state"
STATE_KEY = "attention_backend_class"
PACKED_KEY = "packed_linear_layers"
DECODE_ENV = "AGENT_RUNTIME_CPU_DECODE"  # "lean" (default) or "sglang"
DECODE_TARGET = "sglang.srt.models.llama.LlamaModel.forward"
DECODE_KEY = "cpu_decode"
KERNEL_KEY = "cpu_attention_kernel"
GEMM_KEY = "cpu_gemm_kernel"


def cpu_engine() -> bool:
    return os.environ.get("SGLANG_USE_CPU_ENGINE", "").lower() in ("1", "true")


def active() -> bool:
    return cpu_engine() and os.environ.get(ENV, "prefix-sdpa") != "sglang"


def linear_active() -> bool:
    return cpu_engine() and os.environ.get(LINEAR_ENV, "packed") != "sglang"


def decode_active() -> bool:
    return active() and linear_active() and os.environ.get(DECODE_ENV, "lean") != "sglang"


def _report_state(result: Any, state: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        runner = state.scheduler.tp_worker.model_runner
        backend = runner.attn_backend
        result.internal_state[STATE_KEY] = f"{type(backend).__module__}.{type(backend).__qualname__}"
        from runtime.sglang_adapter.cpu_linear import PACKED

        # linear layers only (their dense weight dropped); the lm_head is packed on its first use
        result.internal_state[PACKED_KEY] = sum(1 for m in runner.model.modules()
                                                if hasattr(m, PACKED) and not hasattr(m, "weight"))
        if decode_active():
            from runtime.sglang_adapter import cpu_decode

            result.internal_state[DECODE_KEY] = cpu_decode.report(runner.model)
        from runtime.sglang_adapter import native

        if active():
            result.internal_state[KERNEL_KEY] = native.report()
        if linear_active():
            result.internal_state[GEMM_KEY] = native.gemm_report()
        from runtime.sglang_adapter import jump_forward

        if jump_forward.active():
            result.internal_state[jump_forward.KEY] = dict(jump_forward.STATS)
    except Exception:  # a report, never a failure of the scheduler's own call
        pass
    return result


def load() -> None:
    if not cpu_engine():
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(STATE_TARGET, _report_state, HookType.AFTER)
    from runtime.sglang_adapter import jump_forward

    if jump_forward.active():
        HookRegistry.register(jump_forward.TARGET, jump_forward.after_result, HookType.AFTER)
    if active():
        from runtime.sglang_adapter.cpu_attention import PrefixSDPABackend

        HookRegistry.register(BACKEND_TARGET, PrefixSDPABackend, HookType.REPLACE)
    if linear_active():
        from runtime.sglang_adapter import cpu_linear

        if cpu_linear.available():
            HookRegistry.register(f"{LINEAR_METHOD}.process_weights_after_loading", cpu_linear.after_weights_loaded,
                                  HookType.AFTER)
            HookRegistry.register(f"{LINEAR_METHOD}.apply", cpu_linear.apply, HookType.AROUND)
            HookRegistry.register(f"{LINEAR_METHOD}.apply_into", cpu_linear.apply_into, HookType.AROUND)
            HookRegistry.register(LM_HEAD_TARGET, cpu_linear.lm_head, HookType.AROUND)
            if decode_active():
                from runtime.sglang_adapter import cpu_decode

                HookRegistry.register(DECODE_TARGET, cpu_decode.forward, HookType.AROUND)
