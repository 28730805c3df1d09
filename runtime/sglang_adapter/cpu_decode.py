"""Decode steps of SGLang's dense Llama models on CPU, without its per-layer machinery.

On a CPU without Intel AMX kernels SGLang runs a decode step in eager PyTorch: for the default
model that is 30 layers of small operators, each reached through SGLang's generic layer code
(the layer-boundary stages that carry the residual, the custom-op dispatch of every norm and
rotary embedding, the linear modules' forward and the plugin hook wrappers around them). A
torch profile of one request decoding on a 2,000-token context counted about 8,300 operator
calls per step, and the time between them was about a third of the step (docs/BENCHMARKS.md,
"CPU decode").

`LlamaModel.forward` gets an AROUND hook (installed by runtime.sglang_adapter.plugin): a decode
step of an eligible model runs `decode`, a loop over the same weights that calls the same leaf
computations directly:
- SGLang's own `RMSNorm.forward_native` (the add of the residual included);
- the packed bf16 GEMMs of runtime.sglang_adapter.cpu_linear;
- `RotaryEmbedding.forward_native`'s arithmetic (apply_rotary_emb, neox style), with the cos/sin
  rows of the step's positions looked up once per step instead of once per layer, and the
  query and key heads rotated in one pass;
- SiluAndMul's `forward_native` formula;
- the attention backend's own `forward_decode` (runtime.sglang_adapter.cpu_attention), which
  writes the step's K/V into the pool and attends.
Every operator gets the same inputs in the same order as on SGLang's path, so the hidden states
are bit-identical; AGENT_RUNTIME_CPU_DECODE_VERIFY=1 runs both paths on every pass and counts the
passes whose outputs differ (the tests run an engine that way).

Plain extend passes (a prefill; the few tokens of a span the grammar forced, appended by
runtime.sglang_adapter.jump_forward) run the same loop with the backend's `forward_extend`: for
a few-token extend the per-layer machinery is as much of the pass as for a decode step
(docs/BENCHMARKS.md, "Tenth round").

A model is eligible when it is exactly SGLang's LlamaModel with nothing this loop does not do:
one pipeline stage and one tensor-parallel rank, no hidden-state capture, every linear layer
packed and without bias or LoRA, plain RMSNorm, a neox-style rotary embedding over the whole
head, no AMX kernels, and the prefix-aware attention backend. Anything else, and every step
that is neither a plain decode nor a plain extend (mixed, speculative, idle, input embeddings)
keeps SGLang's forward.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.model_executor.forward_context import get_attn_backend

from runtime.sglang_adapter.cpu_attention import PrefixSDPABackend
from runtime.sglang_adapter.cpu_linear import PACKED, Packed
from runtime.sglang_adapter.cpu_linear import matmul as _mm

VERIFY_ENV = "AGENT_RUNTIME_CPU_DECODE_VERIFY"
VERIFY = os.environ.get(VERIFY_ENV) == "1"  # read once: set for the engine's processes before they start
_PLAN = "_agent_runtime_decode_plan"  # on the LlamaModel: its _Plan, or why it is not eligible
STATS: dict[str, Any] = {"steps": 0, "extends": 0, "verified": 0, "mismatches": 0}  # steps: passes, extends of them


@dataclass
class _Layer:
    ln1: Any  # RMSNorm modules: their forward_native is called
    ln2: Any
    qkv: Packed  # packed weights
    o: Packed
    gate_up: Packed
    down: Packed
    q_size: int
    kv_size: int
    kv_heads: int
    head_dim: int
    inter: int  # the MLP's intermediate width (gate_up is twice that)
    rotary: Any
    attn: Any  # RadixAttention: what the backend's forward_decode takes as its layer


@dataclass
class _Plan:
    layers: list[_Layer]
    norm: Any


def _packed(linear: Any) -> Packed | None:
    if getattr(linear, "bias", None) is not None or hasattr(linear, "base_layer") or hasattr(linear, "set_lora"):
        return None
    if getattr(linear, "tp_size", 1) != 1:
        return None
    return getattr(linear, PACKED, None)


def _plain_norm(norm: Any) -> bool:
    from sglang.srt.layers.layernorm import RMSNorm

    return (type(norm) is RMSNorm and getattr(norm, "override_orig_dtype", None) is None
            and not getattr(norm, "fp32_residual", False) and getattr(norm, "variance_size_override", None) is None)


def make_plan(model: Any) -> _Plan | str:
    """The decode loop's view of `model`, or the reason it keeps SGLang's forward."""
    from sglang.srt.layers.layernorm import _is_cpu_amx_available as norm_amx
    from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding
    from sglang.srt.layers.rotary_embedding.base import _is_cpu_amx_available as rope_amx
    from sglang.srt.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP, LlamaModel

    if type(model) is not LlamaModel:
        return f"model class {type(model).__name__}"
    if norm_amx or rope_amx:
        return "AMX kernels (SGLang's own CPU path)"
    if not (model.pp_group.is_first_rank and model.pp_group.is_last_rank) or model.layers_to_capture:
        return "pipeline stages or hidden-state capture"
    if model.start_layer != 0 or model.end_layer != len(model.layers) or not _plain_norm(model.norm):
        return "layer range or final norm"
    layers = []
    for layer in model.layers:
        attn: Any = getattr(layer, "self_attn", None)
        mlp: Any = getattr(layer, "mlp", None)
        if type(layer) is not LlamaDecoderLayer or type(attn) is not LlamaAttention or type(mlp) is not LlamaMLP:
            return f"layer class {type(layer).__name__}"
        if not (_plain_norm(layer.input_layernorm) and _plain_norm(layer.post_attention_layernorm)):
            return "norm"
        weights = [_packed(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        if any(w is None for w in weights):
            return "a linear layer not packed (bias, LoRA, tensor parallel or another dtype)"
        if mlp.dual_gemm.mode is not None or getattr(mlp.activation_quant, "enabled", False):
            return "fused MLP kernels"
        rot = attn.rotary_emb
        if (not isinstance(rot, RotaryEmbedding) or type(rot).forward_native is not RotaryEmbedding.forward_native
                or type(rot).forward_cpu is not RotaryEmbedding.forward_cpu or hasattr(rot, "sin_cos_cache")
                or not rot.is_neox_style or rot.rotary_dim != rot.head_size or rot.head_size != attn.head_dim):
            return "rotary embedding"
        radix = attn.attn
        if radix.is_cross_attention or (radix.sliding_window_size or -1) > -1 or radix.qk_head_dim != radix.v_head_dim:
            return "attention layer"
        qkv, o, gate_up, down = (w for w in weights if w is not None)
        layers.append(_Layer(layer.input_layernorm, layer.post_attention_layernorm, qkv, o, gate_up, down,
                             attn.q_size, attn.kv_size, attn.num_kv_heads, attn.head_dim, gate_up.out_features // 2,
                             rot, radix))
    return _Plan(layers, model.norm)


def _plan_of(model: Any) -> _Plan | str:
    plan = getattr(model, _PLAN, None)
    if plan is None:
        plan = make_plan(model)
        setattr(model, _PLAN, plan)
    return plan


def report(causal_lm: Any) -> dict[str, Any]:
    """For the scheduler's internal state: whether the loop runs this model (else why not) and
    its step counts."""
    inner = getattr(causal_lm, "model", None)
    plan = _plan_of(inner) if inner is not None else "no inner model"
    return {"runs": not isinstance(plan, str), "reason": plan if isinstance(plan, str) else "", **STATS}


def decode(plan: _Plan, embed: Any, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: Any) -> torch.Tensor:
    """One decode step's or plain extend pass's final hidden states (after the model's last
    norm), as LlamaModel.forward."""
    backend = get_attn_backend()
    attend = backend.forward_decode if forward_batch.forward_mode.is_decode() else backend.forward_extend
    hidden = embed(input_ids)
    n = hidden.shape[0]
    tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per rotary module: this step's cos, sin
    residual = None
    for lay in plan.layers:
        if residual is None:  # the first layer: the residual is the embedding itself
            x, residual = lay.ln1.forward_native(hidden), hidden
        else:
            x, residual = lay.ln1.forward_native(hidden, residual)
        qkv = _mm(x, lay.qkv)
        rows = tables.get(id(lay.rotary))
        if rows is None:
            cos, sin = lay.rotary.cos_sin_cache.index_select(0, positions.flatten()).chunk(2, dim=-1)
            rows = tables[id(lay.rotary)] = (cos.unsqueeze(-2).to(qkv.dtype), sin.unsqueeze(-2).to(qkv.dtype))
        cos, sin = rows
        rotated = lay.q_size + lay.kv_size
        qk = qkv[:, :rotated].view(n, -1, lay.head_dim)
        x1, x2 = torch.chunk(qk, 2, dim=-1)
        qk = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        q = qk[:, : lay.q_size // lay.head_dim].reshape(n, lay.q_size).contiguous()
        k = qk[:, lay.q_size // lay.head_dim :]
        v = qkv[:, rotated:].view(n, lay.kv_heads, lay.head_dim)
        attended = attend(q, k, v, lay.attn, forward_batch)
        hidden = _mm(attended, lay.o)
        x, residual = lay.ln2.forward_native(hidden, residual)
        gate_up = _mm(x, lay.gate_up)
        hidden = _mm(F.silu(gate_up[..., : lay.inter]) * gate_up[..., lay.inter :], lay.down)
    out, _ = plan.norm.forward_native(hidden, residual)
    return out


def _plain(mode: Any) -> bool:
    """A decode step, or an extend pass of plain prompt tokens (a prefill, a forced span's
    tokens): not mixed with decode rows, not speculative, not idle."""
    return mode.is_decode() or mode == ForwardMode.EXTEND


def forward(original: Any, model: Any, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: Any,
            input_embeds: torch.Tensor | None = None, pp_proxy_tensors: Any = None, *args: Any, **kwargs: Any) -> Any:
    """AROUND hook on LlamaModel.forward: plain decode steps and extend passes of an eligible
    model run `decode`."""
    plan = _plan_of(model)
    if (isinstance(plan, str) or input_embeds is not None or pp_proxy_tensors is not None or args or kwargs
            or not _plain(forward_batch.forward_mode) or not isinstance(get_attn_backend(), PrefixSDPABackend)):
        return original(model, input_ids, positions, forward_batch, input_embeds, pp_proxy_tensors, *args, **kwargs)
    STATS["steps"] += 1
    if not forward_batch.forward_mode.is_decode():
        STATS["extends"] += 1
    if not VERIFY:
        return decode(plan, model.embed_tokens, input_ids, positions, forward_batch)
    expected = original(model, input_ids, positions, forward_batch)
    got = decode(plan, model.embed_tokens, input_ids, positions, forward_batch)  # rewrites the same K/V
    STATS["verified"] += 1
    if not (isinstance(expected, torch.Tensor) and torch.equal(got, expected)):
        STATS["mismatches"] += 1
    return expected
