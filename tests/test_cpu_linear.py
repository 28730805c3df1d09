"""runtime.sglang_adapter.cpu_linear: linear layers and the lm_head on weights packed once give
what SGLang's own unquantized path gives, drop the dense copy loudly, and leave every layer
they do not apply to on SGLang's path; a CPU engine runs all its linear layers packed."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest

from runtime.sglang_adapter import prepare

prepare("cpu")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sglang.srt.layers.logits_processor import LogitsProcessor  # noqa: E402
from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod  # noqa: E402
from sglang.srt.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod  # noqa: E402

from runtime.sglang_adapter import cpu_linear  # noqa: E402

# SGLang's own functions, unwrapped: where this process has loaded the plugin (an embedded engine
# in the same test run), the classes carry its hooks. Held in a namespace, not as module globals:
# SGLang's hook registry also rebinds every module global that holds a function it wraps.
SGLANG = SimpleNamespace(apply=inspect.unwrap(UnquantizedLinearMethod.apply),
                         apply_into=inspect.unwrap(UnquantizedLinearMethod.apply_into),
                         lm_head=inspect.unwrap(LogitsProcessor._compute_lm_head))

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="oneDNN (mkldnn) is not available in this torch")


def _layer(out_features: int, in_features: int, dtype=torch.bfloat16, seed=0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(out_features, in_features, generator=g).to(dtype), requires_grad=False)
    return layer


@pytest.mark.parametrize("out_features,in_features", [(960, 576), (576, 1536), (3072, 576)])
@pytest.mark.parametrize("rows", [1, 3, 8, 37])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_apply_gives_sglangs_result(out_features, in_features, rows, with_bias):
    method = UnquantizedLinearMethod()
    layer = _layer(out_features, in_features)
    dense = layer.weight.detach().clone()
    bias = torch.randn(out_features).to(torch.bfloat16) if with_bias else None
    x = torch.randn(rows, in_features).to(torch.bfloat16)
    expected = SGLANG.apply(method, layer, x, bias)  # SGLang's path: F.linear

    cpu_linear.after_weights_loaded(None, method, layer)
    got = cpu_linear.apply(SGLANG.apply, method, layer, x, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    # the same oneDNN bf16 GEMM, so the same bits; checked against float32 too
    assert torch.equal(got, expected)
    reference = F.linear(x.float(), dense.float(), None if bias is None else bias.float())
    assert (got.float() - reference).abs().max() <= 0.02 * reference.abs().max()


def test_the_dense_weight_is_dropped_and_any_use_of_it_fails_loudly():
    method = UnquantizedLinearMethod()
    layer = _layer(64, 32)
    cpu_linear.after_weights_loaded(None, method, layer)
    packed = getattr(layer, cpu_linear.PACKED)
    assert packed.is_mkldnn and packed.shape == (64, 32)
    assert "weight" not in dict(layer.named_parameters())
    with pytest.raises(AttributeError, match="weight"):
        SGLANG.apply(method, layer, torch.randn(2, 32).to(torch.bfloat16))


def test_batched_inputs_and_apply_into():
    method = UnquantizedLinearMethod()
    layer = _layer(96, 64, seed=3)
    x = torch.randn(2, 5, 64).to(torch.bfloat16)
    expected = F.linear(x, layer.weight)
    cpu_linear.after_weights_loaded(None, method, layer)
    assert torch.equal(cpu_linear.apply(SGLANG.apply, method, layer, x), expected)
    out = torch.empty(10, 96, dtype=torch.bfloat16)
    assert cpu_linear.apply_into(SGLANG.apply_into, method, layer, x.view(10, 64), out) is out
    assert torch.equal(out, expected.view(10, 96))


def test_layers_it_does_not_apply_to_stay_on_sglangs_path():
    method = UnquantizedLinearMethod()
    layer = _layer(16, 8, dtype=torch.float32)
    cpu_linear.after_weights_loaded(None, method, layer)
    assert not hasattr(layer, cpu_linear.PACKED) and not layer.weight.is_meta
    calls = []

    def original(*args):
        calls.append(args)
        return SGLANG.apply(*args)

    x = torch.randn(3, 8)
    assert torch.equal(cpu_linear.apply(original, method, layer, x), F.linear(x, layer.weight)) and len(calls) == 1


def _processor(**kw):
    return SimpleNamespace(**{"use_fp32_lm_head": False, "rl_on_policy_target": None, **kw})


def test_lm_head_packed_on_first_use_gives_sglangs_logits():
    head = _layer(1000, 64, seed=5)
    head.quant_method = UnquantizedEmbeddingMethod()
    hidden = torch.randn(4, 64).to(torch.bfloat16)
    processor = _processor()
    calls = []

    def original(*args, **kwargs):
        calls.append(args)
        return SGLANG.lm_head(*args, **kwargs)

    expected = original(processor, hidden, head)  # SGLang's own: hidden @ weight.T
    calls.clear()
    for _ in range(2):
        got = cpu_linear.lm_head(original, processor, hidden, head)
        assert torch.equal(got, expected)
    assert calls == [] and getattr(head, cpu_linear.PACKED).is_mkldnn
    assert not head.weight.is_meta  # tied to the token embedding: the dense weight stays


def test_lm_head_cases_it_does_not_apply_to_go_to_sglang():
    head = _layer(100, 16, seed=6)
    head.quant_method = UnquantizedEmbeddingMethod()
    hidden = torch.randn(2, 16).to(torch.bfloat16)
    calls = []

    def original(*args, **kwargs):
        calls.append(args)
        return torch.zeros(1)

    for processor, bias in ((_processor(use_fp32_lm_head=True), None), (_processor(), torch.zeros(100).bfloat16())):
        cpu_linear.lm_head(original, processor, hidden, head, bias)
    assert len(calls) == 2 and not hasattr(head, cpu_linear.PACKED)


@pytest.mark.engine
def test_the_cpu_engine_runs_every_linear_layer_packed(backend):
    # Read back from the scheduler process (runtime.sglang_adapter.plugin counts the layers
    # holding a packed weight): q/k/v, o, gate/up and down in each of the model's layers.
    if backend.info.device != "cpu":
        pytest.skip("packed linears are for CPU engines")
    import json
    from pathlib import Path

    layers = json.loads((Path(backend.model_path) / "config.json").read_text())["num_hidden_layers"]
    assert backend.info.extra["packed_linear_layers"] == 4 * layers
