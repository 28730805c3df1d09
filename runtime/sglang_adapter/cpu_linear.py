"""Prepacked bf16 linear layers for CPU engines without Intel AMX kernels.

SGLang's unquantized linear method runs `F.linear` on CPU unless the real `sgl_kernel` with
AMX support is there (it then packs each weight once for its own kernel). A decode step is 30
layers of small GEMMs (a few rows against the whole weight). Measured on this project's CPU
hosts (AVX-512 with bf16, 2 threads), the default model's layer shapes at 1-8 rows run 1.5-2x
faster on a weight reordered once into oneDNN's own layout
(`torch.ops.mkldnn._reorder_linear_weight`, what PyTorch's inductor does for CPU linears) and
multiplied by `torch.ops.mkldnn._linear_pointwise`, with bit-identical results. Together with the
attention's gathers by index_select, a decode step is 1.21-1.27x faster, measured inside one
engine (docs/BENCHMARKS.md, "CPU decode").

The plugin (runtime.sglang_adapter.plugin) installs these hooks in a CPU engine's processes:

- after SGLang's `process_weights_after_loading` of an unquantized linear layer, its bf16 weight
  is reordered once and the dense copy is dropped: the layer's `weight` attribute is deleted, so
  any code that still reads it fails with an AttributeError instead of computing on something
  else (a tensor on the meta device would not do: F.linear accepts one and returns garbage);
- the method's `apply` and `apply_into` run the packed weight;
- the logits processor's lm_head runs a packed copy of the head, made on its first call (the
  head is usually tied to the token embedding, which keeps its dense weight).

A layer whose weight is not a 2-D bf16 CPU tensor keeps SGLang's path. Where neither oneDNN's bf16
GEMM nor the GEMM kernel below runs, the hooks are not installed.

Decode steps multiply only a few rows (one per request) by each weight, and then the cost is reading
the weights: on an Intel Xeon host with AMX (2 cores) oneDNN read them at 10-13 GB/s, where a plain
read reaches about 20 (17-21 against 32 on an AMD EPYC without AMX, where nothing changes). Where
the compiled kernels of runtime.sglang_adapter.native load with Intel AMX (and unless
INFERENCE_CPU_GEMM_KERNEL=false), each weight whose shape divides is also packed for
small_gemm.c, which multiplies up to SMALL_ROWS rows at 17-22 GB/s; more rows (prefills) go to
oneDNN. That is a second copy of the weights (270 MB for the default model). The kernel's sums
can differ from oneDNN's in the last bf16 bit (on the model's shapes they were bit-identical);
tests/test_cpu_linear.py holds both to the same bound against float64.

On a CPU with AVX2 and FMA but no AVX-512 or AMX (an AMD EPYC of the Zen 3 generation, say),
oneDNN has no bf16 GEMM (PyTorch refuses to reorder a bf16 weight there) and F.linear on bf16 runs
a generic loop several times slower than fp32. There every weight whose shape divides is packed
only for small_gemm.c, which runs every call on AVX2 FMAs (`Packed.onednn` is None), prefills
included (docs/BENCHMARKS.md, "eighth round"); a weight whose shape does not divide keeps its
dense copy and SGLang's path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from runtime.sglang_adapter import native

PACKED = "_agent_runtime_packed_weight"


@dataclass(frozen=True)
class Packed:
    """A weight [out, in] packed once: for oneDNN where it multiplies bf16 on this CPU, and for
    small_gemm.c where the kernel runs (at least one of the two)."""

    onednn: torch.Tensor | None  # None: oneDNN has no bf16 here, every call goes to the kernel
    blocks: torch.Tensor | None  # [out/16, in/2, 16, 2] bf16, or None: every call goes to oneDNN

    @property
    def out_features(self) -> int:
        return int(self.onednn.shape[0]) if self.onednn is not None else int(self.blocks.shape[0]) * 16  # type: ignore[union-attr]


def available() -> bool:
    """Whether linear layers can run packed in this process: oneDNN multiplies bf16 here, or the GEMM
    kernel runs."""
    return native.onednn_bf16() or not isinstance(native.load_gemm(), str)


def kernel_rows() -> int:
    """The most rows a call sends to the GEMM kernel (16 on AMX tiles; every call where oneDNN has no
    bf16); 0 where the kernel does not run."""
    kernel = native.load_gemm()
    return 0 if isinstance(kernel, str) else kernel.gemm_max_rows


def pack_blocks(weight: torch.Tensor) -> torch.Tensor | None:
    """W [out, in] bf16 as small_gemm.c reads it, [out/16, in/2, 16, 2] (each 64-byte line two
    consecutive inputs of 16 outputs, 16 lines an AMX tile); None where the shape does not divide."""
    out_features, in_features = weight.shape
    if out_features % 16 or in_features % 32:
        return None
    return weight.view(out_features // 16, 16, in_features // 2, 2).permute(0, 2, 1, 3).contiguous()


def pack(weight: torch.Tensor) -> Packed | None:
    """The weight packed once, or None where it does not apply."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or weight.dim() != 2 or weight.requires_grad:
        return None
    dense = weight.detach().contiguous()
    blocks = None if isinstance(native.load_gemm(), str) else pack_blocks(dense)
    if not native.onednn_bf16():
        return None if blocks is None else Packed(None, blocks)
    return Packed(torch.ops.mkldnn._reorder_linear_weight(dense), blocks)


def matmul(rows: torch.Tensor, packed: Packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    """rows [n, in] (contiguous bf16) @ W^T (+ bias) -> [n, out]: the one GEMM call, no checks."""
    if packed.onednn is None or (packed.blocks is not None and rows.shape[0] <= native.GEMM_MAX_ROWS
                                 and (bias is None or bias.dtype == torch.bfloat16)):
        kernel = native.load_gemm()
        if not isinstance(kernel, str) and packed.blocks is not None:
            return kernel.gemm(rows, packed.blocks, bias)
    return torch.ops.mkldnn._linear_pointwise(rows, packed.onednn, bias, "none", [], "")


def linear(x: torch.Tensor, packed: Packed, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ W^T (+ bias) -> [..., out], computed in bf16 and returned in x's dtype."""
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
    return matmul(rows, packed, bias).view(*x.shape[:-1], packed.out_features).to(x.dtype)


def after_weights_loaded(result: Any, method: Any, layer: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """AFTER hook on UnquantizedLinearMethod.process_weights_after_loading."""
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor):
        packed = pack(weight)
        if packed is not None:
            setattr(layer, PACKED, packed)
            del layer.weight
    return result


def apply(original: Any, method: Any, layer: torch.nn.Module, x: torch.Tensor,
          bias: torch.Tensor | None = None) -> torch.Tensor:
    """AROUND hook on UnquantizedLinearMethod.apply."""
    packed = getattr(layer, PACKED, None)
    if packed is None:
        return original(method, layer, x, bias)
    return linear(x, packed, bias)


def apply_into(original: Any, method: Any, layer: torch.nn.Module, x: torch.Tensor, output: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """AROUND hook on UnquantizedLinearMethod.apply_into (a caller-owned output)."""
    packed = getattr(layer, PACKED, None)
    if packed is None:
        return original(method, layer, x, output, bias)
    output.copy_(linear(x, packed, bias))
    return output


def lm_head(original: Any, processor: Any, hidden_states: torch.Tensor, head: Any,
            embedding_bias: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
    """AROUND hook on LogitsProcessor._compute_lm_head: the plain bf16 head runs packed."""
    weight = getattr(head, "weight", None)
    plain = (embedding_bias is None and kwargs.get("out") is None and isinstance(weight, torch.Tensor)
             and hidden_states.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
             and not getattr(processor, "use_fp32_lm_head", False)
             and getattr(processor, "rl_on_policy_target", None) is None
             and not hasattr(head, "set_lora") and type(getattr(head, "quant_method", None)).__name__ == "UnquantizedEmbeddingMethod")
    if not plain:
        return original(processor, hidden_states, head, embedding_bias, **kwargs)
    packed = getattr(head, PACKED, None)
    if packed is None:
        packed = pack(weight)  # type: ignore[arg-type]
        if packed is None:
            return original(processor, hidden_states, head, embedding_bias, **kwargs)
        setattr(head, PACKED, packed)
    return linear(hidden_states, packed, None)
