"""runtime.sglang_adapter.cpu_linear: linear layers and the lm_head on weights packed once give
what SGLang's own unquantized path gives (oneDNN's bits for more rows than the GEMM kernel takes;
the kernel's, held to the same bound against float64, for fewer: up to 16 on AMX tiles, every call
on an AVX2 host where oneDNN has no bf16), drop the dense copy loudly, and leave every layer they do
not apply to on SGLang's path; a CPU engine runs all its linear layers packed and its decode steps
through the kernel."""

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

from runtime.sglang_adapter import cpu_linear, native  # noqa: E402

# SGLang's own functions, unwrapped: where this process has loaded the plugin (an embedded engine
# in the same test run), the classes carry its hooks. Held in a namespace, not as module globals:
# SGLang's hook registry also rebinds every module global that holds a function it wraps.
SGLANG = SimpleNamespace(apply=inspect.unwrap(UnquantizedLinearMethod.apply),
                         apply_into=inspect.unwrap(UnquantizedLinearMethod.apply_into),
                         lm_head=inspect.unwrap(LogitsProcessor._compute_lm_head))

pytestmark = pytest.mark.skipif(not cpu_linear.available(),
                                reason="neither oneDNN's bf16 GEMM nor the GEMM kernel runs in this process")
GEMM = native.load_gemm()
needs_gemm = pytest.mark.skipif(isinstance(GEMM, str), reason=f"the GEMM kernel: {GEMM}")
ONEDNN = native.onednn_bf16()


def _layer(out_features: int, in_features: int, dtype=torch.bfloat16, seed=0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(out_features, in_features, generator=g).to(dtype), requires_grad=False)
    return layer


def _no_worse_than(got: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, dense: torch.Tensor,
                   bias: torch.Tensor | None) -> None:
    """got is as close to the float64 product as SGLang's own bf16 result is, and differs from it
    by at most one bf16 rounding step (plus fp32 summation error) where it differs at all."""
    reference = F.linear(x.double(), dense.double(), None if bias is None else bias.double())
    err, err_sglang = (got.double() - reference).abs(), (expected.double() - reference).abs()
    assert err.max() <= err_sglang.max() * 1.05 and err.mean() <= err_sglang.mean() * 1.02
    # a bf16 step is at most |value| / 2^7; fp32 sums in another order differ by far less than
    # 2^-16 of the sum of the products' magnitudes
    magnitude = F.linear(x.double().abs(), dense.double().abs())
    step = expected.double().abs() * 2.0 ** -7 + magnitude * 2.0 ** -16
    assert bool(((got.double() - expected.double()).abs() <= step).all())


@pytest.mark.parametrize("out_features,in_features", [(960, 576), (576, 1536), (3072, 576), (80, 64), (40, 7)])
@pytest.mark.parametrize("rows", [1, 3, 8, 13, 16, 17, 37])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_apply_gives_sglangs_result(out_features, in_features, rows, with_bias):
    method = UnquantizedLinearMethod()
    layer = _layer(out_features, in_features)
    dense = layer.weight.detach().clone()
    bias = torch.randn(out_features).to(torch.bfloat16) if with_bias else None
    x = torch.randn(rows, in_features).to(torch.bfloat16)
    expected = SGLANG.apply(method, layer, x, bias)  # SGLang's path: F.linear

    cpu_linear.after_weights_loaded(None, method, layer)
    packed = getattr(layer, cpu_linear.PACKED, None)
    calls = GEMM.gemm_calls if not isinstance(GEMM, str) else 0
    got = cpu_linear.apply(SGLANG.apply, method, layer, x, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    if packed is None:  # no oneDNN bf16 here, and a shape the kernel does not take: SGLang's path
        assert not ONEDNN and cpu_linear.pack_blocks(dense) is None and not layer.weight.is_meta
        assert torch.equal(got, expected)
    elif rows > cpu_linear.kernel_rows() or packed.blocks is None:
        assert torch.equal(got, expected)  # the same oneDNN bf16 GEMM, so the same bits
    else:  # the small-M kernel: its own order of sums
        assert not isinstance(GEMM, str) and GEMM.gemm_calls == calls + 1
        _no_worse_than(got, expected, x, dense, bias)


@needs_gemm
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 16])
@pytest.mark.parametrize("out_features,in_features", [(16, 32), (48, 576), (49152, 576), (576, 1536)])
def test_small_gemm_kernel_against_float64(rows, out_features, in_features):
    # odd and even numbers of 16-column blocks, a last tile of fewer than 8 rows, the lm_head's shape
    g = torch.Generator().manual_seed(rows * 7 + out_features)
    dense = (torch.randn(out_features, in_features, generator=g) * 0.05).to(torch.bfloat16)
    x = torch.randn(rows, in_features, generator=g).to(torch.bfloat16)
    bias = torch.randn(out_features, generator=g).to(torch.bfloat16)
    blocks = cpu_linear.pack_blocks(dense)
    assert blocks is not None and blocks.shape == (out_features // 16, in_features // 2, 16, 2)
    assert not isinstance(GEMM, str)
    for b in (None, bias):
        _no_worse_than(GEMM.gemm(x, blocks, b), F.linear(x, dense, b), x, dense, b)
    # rows further apart than the inputs (a view of a wider tensor) are read in place
    wide = torch.zeros(rows, in_features + 32, dtype=torch.bfloat16)
    wide[:, :in_features] = x
    assert torch.equal(GEMM.gemm(wide[:, :in_features], blocks), GEMM.gemm(x, blocks))


@pytest.mark.skipif(isinstance(GEMM, str) or GEMM.gemm_max_rows <= native.GEMM_MAX_ROWS,
                    reason="the GEMM on AVX2 (hosts without AMX where oneDNN has no bf16) takes any number of rows")
@pytest.mark.parametrize("rows", [6, 8, 13, 17, 37, 300])
def test_the_avx2_gemm_takes_prefills_too(rows):
    g = torch.Generator().manual_seed(rows)
    dense = (torch.randn(96, 576, generator=g) * 0.05).to(torch.bfloat16)
    x = torch.randn(rows, 576, generator=g).to(torch.bfloat16)
    bias = torch.randn(96, generator=g).to(torch.bfloat16)
    blocks = cpu_linear.pack_blocks(dense)
    assert blocks is not None and not isinstance(GEMM, str)
    got = GEMM.gemm(x, blocks, bias)
    _no_worse_than(got, F.linear(x, dense, bias), x, dense, bias)
    # a row's result does not depend on the rows around it (passes of 8 rows by half a block, of up
    # to 4 rows by a whole block): the first and last alone, the second half together
    for lo, hi in ((0, 1), (rows - 1, rows), (rows // 2, rows)):
        assert torch.equal(got[lo:hi], GEMM.gemm(x[lo:hi], blocks, bias))


@needs_gemm
def test_small_gemm_kernel_keeps_a_nan_in_its_row():
    # a NaN input makes its row's outputs NaN (rounded to bf16 as NaN, not to an infinity or a
    # zero) and leaves the other rows as they were
    g = torch.Generator().manual_seed(5)
    dense = torch.randn(32, 64, generator=g).to(torch.bfloat16)
    x = torch.randn(3, 64, generator=g).to(torch.bfloat16)
    blocks = cpu_linear.pack_blocks(dense)
    assert blocks is not None and not isinstance(GEMM, str)
    clean = GEMM.gemm(x, blocks)
    x[1, 5] = float("nan")
    got = GEMM.gemm(x, blocks)
    assert bool(got[1].isnan().all()) and torch.equal(got[0::2], clean[0::2])


@needs_gemm
def test_small_gemm_kernel_refuses_what_it_does_not_compute():
    blocks = cpu_linear.pack_blocks(torch.zeros(32, 64, dtype=torch.bfloat16))
    assert blocks is not None and cpu_linear.pack_blocks(torch.zeros(24, 64, dtype=torch.bfloat16)) is None
    assert cpu_linear.pack_blocks(torch.zeros(32, 48, dtype=torch.bfloat16)) is None  # inputs: 32 per tile
    assert not isinstance(GEMM, str)
    bf16 = torch.bfloat16
    for rows, bias in ((torch.zeros(2, 64), None),  # fp32 rows
                       (torch.zeros(2, 32, dtype=bf16), None),  # inputs do not match
                       (torch.zeros(2, 64, dtype=bf16), torch.zeros(16, dtype=bf16)),  # bias of another size
                       (torch.zeros(64, 2, dtype=bf16).t(), None),  # inputs not dense
                       (torch.zeros(0, 64, dtype=bf16), None),
                       *[(torch.zeros(GEMM.gemm_max_rows + 1, 64, dtype=bf16), None)  # too many rows (AMX)
                         for _ in range(GEMM.gemm_max_rows <= native.GEMM_MAX_ROWS)]):
        with pytest.raises(ValueError, match="small GEMM"):
            GEMM.gemm(rows, blocks, bias)


def test_with_the_kernel_turned_off_every_call_is_onednn(monkeypatch):
    monkeypatch.setattr(native, "load_gemm", lambda: "turned off (INFERENCE_CPU_GEMM_KERNEL=false)")
    method = UnquantizedLinearMethod()
    layer = _layer(960, 576)
    x = torch.randn(3, 576).to(torch.bfloat16)
    expected = SGLANG.apply(method, layer, x)
    cpu_linear.after_weights_loaded(None, method, layer)
    if ONEDNN:
        assert getattr(layer, cpu_linear.PACKED).blocks is None
    else:  # nothing to pack for: the layer keeps its dense weight and SGLang's path
        assert not hasattr(layer, cpu_linear.PACKED) and not layer.weight.is_meta
    assert torch.equal(cpu_linear.apply(SGLANG.apply, method, layer, x), expected)


def test_the_dense_weight_is_dropped_and_any_use_of_it_fails_loudly():
    method = UnquantizedLinearMethod()
    layer = _layer(64, 32)
    cpu_linear.after_weights_loaded(None, method, layer)
    packed = getattr(layer, cpu_linear.PACKED)
    assert (packed.onednn.is_mkldnn if ONEDNN else packed.onednn is None) and packed.out_features == 64
    assert (packed.blocks is None) == isinstance(GEMM, str)
    assert "weight" not in dict(layer.named_parameters())
    with pytest.raises(AttributeError, match="weight"):
        SGLANG.apply(method, layer, torch.randn(2, 32).to(torch.bfloat16))


@pytest.mark.parametrize("batch", [(2, 5), (4, 10)])  # 10 rows (the kernel), 40 (oneDNN, or the AVX2 kernel)
def test_batched_inputs_and_apply_into(batch):
    method = UnquantizedLinearMethod()
    layer = _layer(96, 64, seed=3)
    x = torch.randn(*batch, 64).to(torch.bfloat16)
    cpu_linear.after_weights_loaded(None, method, layer)
    rows = x.view(-1, 64)
    expected = cpu_linear.matmul(rows, getattr(layer, cpu_linear.PACKED)).view(*batch, 96)
    assert torch.equal(cpu_linear.apply(SGLANG.apply, method, layer, x), expected)
    out = torch.empty(rows.shape[0], 96, dtype=torch.bfloat16)
    assert cpu_linear.apply_into(SGLANG.apply_into, method, layer, rows, out) is out
    assert torch.equal(out, expected.view(-1, 96))


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
    head = _layer(1024, 64, seed=5)
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
        _no_worse_than(got, expected, hidden, head.weight, None)  # 4 rows: the small-M kernel where it runs
    packed = getattr(head, cpu_linear.PACKED)
    assert calls == [] and (packed.blocks is None) == isinstance(GEMM, str)
    assert packed.onednn.is_mkldnn if ONEDNN else packed.onednn is None
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


@pytest.mark.engine
async def test_the_cpu_engines_decode_steps_run_the_small_gemm_kernel(backend):
    # Read back from the scheduler process: every linear layer and the lm_head of each decode step
    # went through the kernel (4 per layer + 1).
    if backend.info.device != "cpu":
        pytest.skip("the small-M GEMM kernel is for CPU engines")
    if isinstance(GEMM, str):
        assert backend.info.extra["cpu_gemm_kernel"].startswith("onednn (")
        pytest.skip(f"the small-M GEMM kernel: {GEMM}")
    from conftest import plugin_report_around_request

    assert backend.info.extra["cpu_gemm_kernel"] == "native"
    import json
    from pathlib import Path

    layers = json.loads((Path(backend.model_path) / "config.json").read_text())["num_hidden_layers"]
    before, after = await plugin_report_around_request(backend, "cpu_gemm_kernel", new_tokens=8)
    assert after["runs"] and after["calls"] >= before["calls"] + 7 * (4 * layers + 1)
