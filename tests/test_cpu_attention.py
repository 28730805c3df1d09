"""runtime.cpu_attention: the prefix-aware SDPA backend gives SGLang's torch_native results on
the shapes the CPU engine sends it (extends on cached prefixes, first prefills, decode batches,
grouped-query heads), and runtime.sglang_adapter.plugin installs it only in a CPU engine's processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import plugin_report_around_request
from runtime.sglang_adapter import prepare

prepare("cpu")

import torch  # noqa: E402
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend  # noqa: E402

from runtime.sglang_adapter import cpu_attention, native  # noqa: E402
from runtime.sglang_adapter.cpu_attention import PrefixSDPABackend  # noqa: E402


def _pool(seq_lens, kv_heads, dim, dtype, seed):
    """A KV pool with each request's tokens at scattered slots, as SGLang's allocator leaves them."""
    g = torch.Generator().manual_seed(seed)
    total = sum(seq_lens)
    slots = torch.randperm(total + 64, generator=g)[:total] + 1
    req_to_token = torch.zeros(len(seq_lens) + 2, max(seq_lens) + 8, dtype=torch.int64)
    at = 0
    pool_idx = torch.tensor([i + 1 for i in range(len(seq_lens))])  # not 0..n-1 on purpose
    for i, n in enumerate(seq_lens):
        req_to_token[pool_idx[i], :n] = slots[at : at + n]
        at += n
    k = torch.randn(total + 80, kv_heads, dim, generator=g).to(dtype)
    v = torch.randn(total + 80, kv_heads, dim, generator=g).to(dtype)
    return k, v, req_to_token, pool_idx


def _backends():
    # The methods under test use no state set up by __init__ (which needs a model runner).
    return object.__new__(TorchNativeAttnBackend), object.__new__(PrefixSDPABackend)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4)])
def test_extend_matches_sglang(dtype, tol, heads, kv_heads, monkeypatch):
    monkeypatch.setattr(cpu_attention, "QUERY_BLOCK", 16)  # several query blocks per request
    dim = 32
    # (cached prefix, new tokens) per request: a cache hit, a first prefill longer than one
    # block, a one-token extend, a request with nothing new
    plan = [(37, 5), (0, 40), (70, 1), (12, 0), (3, 33)]
    seq_lens = [p + n for p, n in plan]
    k, v, r2t, pool_idx = _pool(seq_lens, kv_heads, dim, dtype, seed=1)
    n_tokens = sum(n for _, n in plan)
    q = torch.randn(n_tokens, heads, dim, generator=torch.Generator().manual_seed(2)).to(dtype)
    args = (k, v, r2t, pool_idx, torch.tensor(seq_lens), torch.tensor([p for p, _ in plan]),
            torch.tensor([n for _, n in plan]))
    ref, new = _backends()
    out_ref = ref._run_sdpa_forward_extend(q, torch.zeros(n_tokens, heads, dim, dtype=dtype), *args,
                                           scaling=dim**-0.5, enable_gqa=heads != kv_heads, causal=True)
    out_new = new._run_sdpa_forward_extend(q, torch.zeros(n_tokens, heads, dim, dtype=dtype), *args,
                                           scaling=dim**-0.5, enable_gqa=heads != kv_heads, causal=True)
    assert out_new.shape == out_ref.shape
    assert torch.allclose(out_new.float(), out_ref.float(), atol=tol, rtol=tol), (out_new.float() - out_ref.float()).abs().max()


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (6, 1), (4, 4)])
def test_decode_matches_sglang(heads, kv_heads):
    dim = 16
    seq_lens = [50, 1, 129, 7]
    k, v, r2t, pool_idx = _pool(seq_lens, kv_heads, dim, torch.float32, seed=3)
    q = torch.randn(len(seq_lens), heads, dim, generator=torch.Generator().manual_seed(4))
    args = (k, v, r2t, pool_idx, torch.tensor(seq_lens))
    ref, new = _backends()
    out_ref = ref._run_sdpa_forward_decode(q, torch.zeros_like(q), *args, scaling=0.3, enable_gqa=heads != kv_heads)
    out_new = new._run_sdpa_forward_decode(q, torch.zeros_like(q), *args, scaling=0.3, enable_gqa=heads != kv_heads)
    assert torch.allclose(out_new, out_ref, atol=1e-5, rtol=1e-5)


def test_unsupported_layers_fall_back_to_sglang():
    # a sliding window is SGLang's own code path, result for result
    dim, heads, kv_heads = 8, 2, 1
    seq_lens = [20]
    k, v, r2t, pool_idx = _pool(seq_lens, kv_heads, dim, torch.float32, seed=5)
    q = torch.randn(6, heads, dim, generator=torch.Generator().manual_seed(6))
    args = (k, v, r2t, pool_idx, torch.tensor(seq_lens), torch.tensor([14]), torch.tensor([6]))
    ref, new = _backends()
    kw = dict(scaling=0.5, enable_gqa=True, causal=True, sliding_window_size=4)
    out_ref = ref._run_sdpa_forward_extend(q, torch.zeros_like(q), *args, **kw)
    out_new = new._run_sdpa_forward_extend(q, torch.zeros_like(q), *args, **kw)
    assert torch.equal(out_new, out_ref)


_PROBE = """
import sys
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.layers.attention import torch_native_backend as m
from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod
print(m.TorchNativeAttnBackend.__module__ + "." + m.TorchNativeAttnBackend.__name__)
print("packed" if getattr(UnquantizedLinearMethod.apply, "__wrapped__", None) else "sglang")
from sglang.srt.models.llama import LlamaModel
print("lean" if getattr(LlamaModel.forward, "__wrapped__", None) else "sglang")
"""

PREFIX_SDPA = "runtime.sglang_adapter.cpu_attention.PrefixSDPABackend"
TORCH_NATIVE = "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend"
# (environment, attention backend class, linear layers, decode steps) as the plugin leaves them
PLUGIN_CASES = [
    ({"SGLANG_USE_CPU_ENGINE": "1"}, PREFIX_SDPA, "packed", "lean"),
    ({"SGLANG_USE_CPU_ENGINE": "1", "AGENT_RUNTIME_CPU_ATTENTION": "sglang"}, TORCH_NATIVE, "packed", "sglang"),
    ({"SGLANG_USE_CPU_ENGINE": "1", "AGENT_RUNTIME_CPU_LINEAR": "sglang"}, PREFIX_SDPA, "sglang", "sglang"),
    ({"SGLANG_USE_CPU_ENGINE": "1", "AGENT_RUNTIME_CPU_DECODE": "sglang"}, PREFIX_SDPA, "packed", "sglang"),
    ({"SGLANG_USE_CPU_ENGINE": "0"}, TORCH_NATIVE, "sglang", "sglang"),
]


@pytest.fixture(scope="module")
def plugin_probes():
    """Each case's probe, run in a fresh process; all at once (each is an SGLang import, ~10 s)."""
    drop = ("SGLANG_USE_CPU_ENGINE", "AGENT_RUNTIME_CPU_ATTENTION", "AGENT_RUNTIME_CPU_LINEAR", "AGENT_RUNTIME_CPU_DECODE")
    base = {k: v for k, v in os.environ.items() if k not in drop}
    procs = [subprocess.Popen([sys.executable, "-c", _PROBE], env={**base, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for env, *_ in PLUGIN_CASES]
    try:
        return [(*p.communicate(timeout=300), p.returncode) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.parametrize("case", range(len(PLUGIN_CASES)),
                         ids=["cpu-engine", "cpu-engine-sglang-attention", "cpu-engine-sglang-linear",
                              "cpu-engine-sglang-decode", "not-cpu"])
def test_plugin_installs_the_backend_in_a_fresh_sglang_process(case, plugin_probes):
    # What SGLang's scheduler process does first: load the installed plugins (entry points).
    _, attention, linear, decode = PLUGIN_CASES[case]
    stdout, stderr, returncode = plugin_probes[case]
    assert returncode == 0, stderr[-2000:]
    assert stdout.strip().splitlines()[-3:] == [attention, linear, decode]


@pytest.mark.engine
def test_the_engine_scheduler_runs_prefix_sdpa(backend):
    # Read back from the scheduler process itself (runtime.sglang_adapter.plugin reports the class its
    # model runner holds): fails if the entry point is not installed or the hook did not apply.
    if backend.info.device != "cpu":
        pytest.skip("the CPU attention backend is for CPU engines")
    assert backend.info.extra["attention_class"] == "runtime.sglang_adapter.cpu_attention.PrefixSDPABackend"
    assert backend.info.attention_backend == "torch_native+prefix-sdpa"


def _shared_pool(plan, kv_heads, dim, dtype, seed, *, contiguous):
    """A pool where requests share prefixes at the same slots, as the radix cache leaves them:
    `plan` is [(agent, shared tokens, own tokens)]; requests of one agent share its prefix."""
    g = torch.Generator().manual_seed(seed)
    size = 64 + sum(p for _, p, _ in plan) + sum(o for _, _, o in plan)
    free = torch.randperm(size - 1, generator=g) + 1
    at = 0
    prefixes: dict[int, torch.Tensor] = {}
    rows = []
    for agent, shared, own in plan:
        if agent not in prefixes:
            base = int(free[at]) if not contiguous else at + 1
            prefixes[agent] = torch.arange(base, base + shared) if contiguous else free[at : at + shared]
            at += shared
        prefix = prefixes[agent][:shared]
        rows.append(torch.cat([prefix, free[at : at + own]]))
        at += own
    k = torch.randn(size + 2 * at, kv_heads, dim, generator=g).to(dtype)
    v = torch.randn(size + 2 * at, kv_heads, dim, generator=g).to(dtype)
    longest = max(r.numel() for r in rows)
    req_to_token = torch.zeros(len(rows) + 3, longest + 5, dtype=torch.int64)
    pool_idx = torch.tensor([len(rows) + 2 - i for i in range(len(rows))])  # not 0..n-1 on purpose
    for i, r in enumerate(rows):
        req_to_token[pool_idx[i], : r.numel()] = r
    return k, v, req_to_token, pool_idx, torch.tensor([r.numel() for r in rows])


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (6, 1)])
def test_decode_shares_prefixes_and_matches_sglang(contiguous, dtype, tol, heads, kv_heads):
    dim = 32
    # two agents with 3 and 2 requests (own parts of different lengths), one request alone, and
    # one agent request whose shared prefix is shorter than MIN_SHARED_PREFIX (decoded alone)
    plan = [(0, 120, 7), (0, 120, 1), (1, 80, 40), (0, 120, 30), (2, 50, 5), (1, 80, 2), (3, 10, 3), (3, 10, 9)]
    k, v, r2t, pool_idx, seq_lens = _shared_pool(plan, kv_heads, dim, dtype, seed=7, contiguous=contiguous)
    q = torch.randn(len(plan), heads, dim, generator=torch.Generator().manual_seed(8)).to(dtype)
    ref, new = _backends()
    made = cpu_attention.decode_plan(r2t, pool_idx, seq_lens, dtype)
    assert sorted(len(gr.members) for gr in made.groups) == [2, 3]  # agents 0 and 1
    assert sorted(i for i, _ in made.singles) == [4, 6, 7]
    assert all(isinstance(gr.prefix, slice) == contiguous for gr in made.groups)
    args = (k, v, r2t, pool_idx, seq_lens)
    out_ref = ref._run_sdpa_forward_decode(q, torch.zeros_like(q), *args, scaling=dim**-0.5, enable_gqa=heads != kv_heads)
    out_new = new._run_sdpa_forward_decode(q, torch.zeros_like(q), *args, scaling=dim**-0.5, enable_gqa=heads != kv_heads)
    assert torch.allclose(out_new.float(), out_ref.float(), atol=tol, rtol=tol), (out_new.float() - out_ref.float()).abs().max()
    # A new step (another batch in the same tensors' places) gets a new plan, not the old one.
    seq2 = seq_lens.clone()
    out2 = new._run_sdpa_forward_decode(q[:3], torch.zeros_like(q[:3]), k, v, r2t, pool_idx[:3], seq2[:3], scaling=dim**-0.5)
    ref2 = ref._run_sdpa_forward_decode(q[:3], torch.zeros_like(q[:3]), k, v, r2t, pool_idx[:3], seq2[:3], scaling=dim**-0.5,
                                        enable_gqa=heads != kv_heads)
    assert torch.allclose(out2.float(), ref2.float(), atol=tol, rtol=tol)


def test_agents_sharing_a_short_header_form_one_group_each():
    """Two agents' prompts share the template's first tokens (same slots), then differ: each
    agent's requests are a group of their own (not one group sharing only the header)."""
    g = torch.Generator().manual_seed(11)
    header = torch.arange(1, 11)  # 10 shared slots: shorter than MIN_SHARED_PREFIX
    agents = [torch.arange(100, 100 + 80), torch.arange(300, 300 + 60)]
    rows = []
    for i, agent in enumerate([0, 1, 0, 1, 1]):
        own = torch.arange(1000 + 50 * i, 1000 + 50 * i + 5 + i)
        rows.append(torch.cat([header, agents[agent], own]))
    r2t = torch.zeros(8, max(r.numel() for r in rows) + 2, dtype=torch.int64)
    pool_idx = torch.tensor([3, 1, 6, 2, 7])
    for p, r in zip(pool_idx.tolist(), rows, strict=True):
        r2t[p, : r.numel()] = r
    seq_lens = torch.tensor([r.numel() for r in rows])
    made = cpu_attention.decode_plan(r2t, pool_idx, seq_lens, torch.float32)
    assert sorted(gr.members.tolist() for gr in made.groups) == [[0, 2], [1, 3, 4]] and made.singles == []
    assert sorted((gr.prefix.stop - gr.prefix.start) if isinstance(gr.prefix, slice) else gr.prefix.numel()
                  for gr in made.groups) == [70, 90]
    k = torch.randn(1300, 3, 16, generator=g)
    v = torch.randn(1300, 3, 16, generator=g)
    q = torch.randn(len(rows), 9, 16, generator=g)
    ref, new = _backends()
    args = (k, v, r2t, pool_idx, seq_lens)
    out_ref = ref._run_sdpa_forward_decode(q, torch.zeros_like(q), *args, scaling=0.25, enable_gqa=True)
    out_new = new._run_sdpa_forward_decode(q, torch.zeros_like(q), *args, scaling=0.25, enable_gqa=True)
    assert torch.allclose(out_new, out_ref, atol=1e-5, rtol=1e-5)


def _kernel_or_skip():
    kernel = native.load()
    if isinstance(kernel, str):
        # Only hardware without the instructions may skip: a missing compiler or a failed build on
        # a machine that has them is a failure (CI machines have both).
        if kernel.startswith(("the CPU lacks", "needs x86-64")):
            pytest.skip(f"decode attention kernel: {kernel}")
        pytest.fail(f"decode attention kernel unavailable: {kernel}")
    return kernel


def _extend_kernel(kernel):
    # wherever the library builds (AVX-512 BF16, or AVX2 and FMA), it has the extend kernel
    assert kernel.extend_ready
    return kernel


@pytest.fixture(params=[False, True], ids=["fma", "amx"])
def paths(request):
    """The kernel with its attention on fp32 FMAs and VDPBF16PS, then on AMX tiles (where the CPU
    has AMX and the OS grants the tiles; skipped elsewhere); the setting restored after."""
    kernel = _kernel_or_skip()
    before = kernel.attention_amx()
    if kernel.attention_amx(request.param) != request.param:
        kernel.attention_amx(before)
        pytest.skip("attention on AMX tiles: this CPU has no AMX, or the OS does not grant the tiles")
    yield kernel
    kernel.attention_amx(before)


def _reference64(q, k, v, r2t, pool_idx, seq_lens, scale):
    """Each request's attention over its whole context in float64."""
    kv_heads = k.shape[1]
    out = []
    for i, (p, n) in enumerate(zip(pool_idx.tolist(), seq_lens.tolist(), strict=True)):
        slots = r2t[p, :n]
        keys, values = k[slots].double().transpose(0, 1), v[slots].double().transpose(0, 1)  # [Hkv, n, D]
        qi = q[i].double().view(kv_heads, -1, q.shape[-1])
        weights = (torch.einsum("hgd,hnd->hgn", qi, keys) * scale).softmax(-1)
        out.append(torch.einsum("hgn,hnd->hgd", weights, values).reshape(q.shape[1], -1))
    return torch.stack(out)


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 64), (8, 1, 128), (12, 2, 128)])
def test_decode_kernel_matches_sglang(contiguous, heads, kv_heads, dim, paths):
    """The compiled kernel (bf16 model, head dim 64/128) on the same batch as
    test_decode_shares_prefixes_and_matches_sglang, plus own parts longer than one of its chunks
    (256 keys), on each of its paths: as close to SGLang's SDPA as SDPA's own bf16 rounding allows,
    and within one bf16 rounding of a float64 reference."""
    kernel = paths
    plan = [(0, 300, 7), (0, 300, 1), (1, 80, 600), (0, 300, 30), (2, 50, 5), (1, 80, 2), (3, 10, 3), (3, 10, 9),
            (4, 1, 0)]
    k, v, r2t, pool_idx, seq_lens = _shared_pool(plan, kv_heads, dim, torch.bfloat16, seed=17, contiguous=contiguous)
    q = torch.randn(len(plan), heads, dim, generator=torch.Generator().manual_seed(18)).to(torch.bfloat16)
    made = cpu_attention.decode_plan(r2t, pool_idx, seq_lens, torch.bfloat16, lists=True)
    assert made.lists is not None and made.groups == [] and made.singles == []
    # agents 0 and 1: a prefix list and an own list per member; requests 4, 6, 7, 8 alone
    assert made.lists.key_start.numel() - 1 == (1 + 3) + (1 + 2) + 4
    _check_decode_kernel(kernel, q, k, v, r2t, pool_idx, seq_lens)


def _check_decode_kernel(kernel, q, k, v, r2t, pool_idx, seq_lens):
    """One call of the kernel for the batch: as close to SGLang's SDPA as SDPA's own bf16 rounding
    allows, and within one bf16 rounding of a float64 reference."""
    heads, dim, kv_heads = q.shape[1], q.shape[2], k.shape[1]
    ref, new = _backends()
    args = (k, v, r2t, pool_idx, seq_lens)
    calls = kernel.calls
    out_new = new._run_sdpa_forward_decode(q, torch.zeros_like(q), *args, scaling=dim**-0.5, enable_gqa=heads != kv_heads)
    assert kernel.calls == calls + 1
    out_ref = ref._run_sdpa_forward_decode(q, torch.zeros_like(q), *args, scaling=dim**-0.5, enable_gqa=heads != kv_heads)
    assert torch.allclose(out_new.float(), out_ref.float(), atol=2e-2, rtol=2e-2), (out_new.float() - out_ref.float()).abs().max()
    exact = _reference64(q, k, v, r2t, pool_idx, seq_lens, dim**-0.5)
    assert ((out_new.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-4).all(), (out_new.double() - exact).abs().max()


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 64), (8, 1, 128)])
def test_decode_kernel_many_rows_sharing_a_prefix(heads, kv_heads, dim, paths):
    """Twelve requests of one agent and five of another, on each path: the AMX path takes up to 32
    query vectors of a KV head at once (two tiles of 16; 9/3 heads: groups of 10 rows and 2, 8/1:
    of 4), over a prefix that ends inside its second chunk of keys; within one bf16 rounding of a
    float64 reference, and as close to SGLang's SDPA as the batch above."""
    plan = [(0, 333, own) for own in (1, 2, 40, 3, 300, 7, 0, 9, 260, 5, 6, 11)]
    plan += [(1, 64, own) for own in (17, 1, 2, 90, 4)]
    k, v, r2t, pool_idx, seq_lens = _shared_pool(plan, kv_heads, dim, torch.bfloat16, seed=21, contiguous=False)
    q = torch.randn(len(plan), heads, dim, generator=torch.Generator().manual_seed(22)).to(torch.bfloat16)
    made = cpu_attention.decode_plan(r2t, pool_idx, seq_lens, torch.bfloat16, lists=True)
    assert made.lists is not None
    members = (made.lists.row_start[1:] - made.lists.row_start[:-1]).tolist()
    assert sorted(members)[-2:] == [5, 12], members  # the two prefixes, each attended by all its rows at once
    _check_decode_kernel(paths, q, k, v, r2t, pool_idx, seq_lens)


def _extend_batch(plan, heads, kv_heads, dim, seed, *, contexts=None):
    """An extend step: plan is [(cached, new)] per request; contexts (optional) fixes each request's
    context slots, so the same prompt can be sent with different cached lengths."""
    g = torch.Generator().manual_seed(seed)
    totals = [p + n for p, n in plan]
    size = 64 + 2 * sum(totals)
    if contexts is None:
        free = torch.randperm(size - 1, generator=g) + 1
        contexts, at = [], 0
        for t in totals:
            contexts.append(free[at : at + t])
            at += t
    k = torch.randn(size, kv_heads, dim, generator=g).to(torch.bfloat16)
    v = torch.randn(size, kv_heads, dim, generator=g).to(torch.bfloat16)
    r2t = torch.zeros(len(plan) + 2, max(totals) + 3, dtype=torch.int64)
    pool_idx = torch.tensor([len(plan) + 1 - i for i in range(len(plan))])  # not 0..n-1 on purpose
    for i, c in enumerate(contexts):
        r2t[pool_idx[i], : c.numel()] = c
    return k, v, r2t, pool_idx, torch.tensor(totals), torch.tensor([p for p, _ in plan]), torch.tensor([n for _, n in plan])


def _extend_reference64(q, k, v, r2t, pool_idx, seq_lens, extend_lens, scale):
    """Each new row's causal attention over its context, in float64."""
    kv_heads, out, row = k.shape[1], torch.zeros(q.shape, dtype=torch.float64), 0
    for p, total, new in zip(pool_idx.tolist(), seq_lens.tolist(), extend_lens.tolist(), strict=True):
        slots = r2t[p, :total]
        keys, values = k[slots].double().transpose(0, 1), v[slots].double().transpose(0, 1)  # [Hkv, T, D]
        for x in range(new):
            pos = total - new + x
            qi = q[row].double().view(kv_heads, -1, q.shape[-1])
            w = (torch.einsum("hgd,hnd->hgn", qi, keys[:, : pos + 1]) * scale).softmax(-1)
            out[row] = torch.einsum("hgn,hnd->hgd", w, values[:, : pos + 1]).reshape(q.shape[1], -1)
            row += 1
    return out


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 64), (8, 1, 128), (12, 2, 128), (10, 2, 64)])
def test_extend_kernel_matches_sglang(heads, kv_heads, dim, paths):
    """Extends (prefills) run the compiled kernel for a bf16 model with head dim 64/128: a turn on a
    cached prefix, a first prefill of several query tiles and key blocks, one-token extends, a
    request with nothing new, contexts not a multiple of the kernel's blocks; as close to SGLang's
    SDPA as SDPA's own bf16 rounding allows, and as close as SDPA to a float64 reference; on each
    path (VDPBF16PS or, on AVX2, fp32 FMAs; AMX tiles)."""
    kernel = _extend_kernel(paths)
    _check_extend(kernel, "extend_calls", [(301, 77), (0, 130), (70, 1), (12, 0), (3, 33), (0, 1), (33, 2)],
                  heads, kv_heads, dim, seed=31)


def _check_extend(kernel, counter, plan, heads, kv_heads, dim, seed):
    """One extend step on the backend: one call of the kernel (its `counter`), as close to SGLang's
    SDPA as SDPA's own bf16 rounding allows, and as close as SDPA to a float64 reference (SDPA and
    the AVX-512 paths round the probabilities to bf16 for P V; the AVX2 path keeps them fp32)."""
    k, v, r2t, pool_idx, seq_lens, prefix, extend = _extend_batch(plan, heads, kv_heads, dim, seed=seed)
    q = torch.randn(int(extend.sum()), heads, dim, generator=torch.Generator().manual_seed(seed + 1)).to(torch.bfloat16)
    args = (k, v, r2t, pool_idx, seq_lens, prefix, extend)
    ref, new = _backends()
    calls = getattr(kernel, counter)
    out_new = new._run_sdpa_forward_extend(q, torch.zeros_like(q), *args, scaling=dim**-0.5, enable_gqa=True, causal=True)
    assert getattr(kernel, counter) == calls + 1
    out_ref = ref._run_sdpa_forward_extend(q, torch.zeros_like(q), *args, scaling=dim**-0.5, enable_gqa=True, causal=True)
    assert torch.allclose(out_new.float(), out_ref.float(), atol=2e-2, rtol=2e-2), (out_new.float() - out_ref.float()).abs().max()
    exact = _extend_reference64(q, k, v, r2t, pool_idx, seq_lens, extend, dim**-0.5)
    err_new, err_ref = (out_new.double() - exact).abs(), (out_ref.double() - exact).abs()
    assert err_new.mean() <= err_ref.mean() * 1.05 and err_new.max() <= err_ref.max() * 1.25, (err_new.max(), err_ref.max())


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (8, 1, 128)])
def test_small_extends_run_the_decode_kernel_where_the_extend_kernel_packs_fp32(heads, kv_heads, dim, paths,
                                                                                monkeypatch):
    """Extends of a few new rows per request (jump-forward's forced spans), where the extend kernel
    computes on fp32 (AVX2): one decode-kernel call, each row attending the slots up to its
    position; as close to SGLang's SDPA as SDPA's own bf16 rounding allows, and as close as SDPA to
    a float64 reference. A request with more than SMALL_EXTEND new rows sends the step to the
    extend kernel; where the extend kernel is the AVX-512 one, every extend goes there."""
    kernel = paths
    monkeypatch.setattr(kernel, "extend_fp32", True)
    small = cpu_attention.SMALL_EXTEND
    _check_extend(kernel, "calls", [(301, 3), (70, 1), (12, 0), (0, 5), (33, small), (500, 4)], heads, kv_heads, dim,
                  seed=51)
    for fp32, plan in [(True, [(40, small + 1), (30, 2)]), (False, [(300, 3)])]:
        monkeypatch.setattr(kernel, "extend_fp32", fp32)
        calls, extend_calls = kernel.calls, kernel.extend_calls
        k, v, r2t, pool_idx, seq_lens, prefix, extend = _extend_batch(plan, heads, kv_heads, dim, seed=53)
        q = torch.randn(int(extend.sum()), heads, dim, generator=torch.Generator().manual_seed(54)).to(torch.bfloat16)
        new = _backends()[1]
        new._run_sdpa_forward_extend(q, torch.zeros_like(q), k, v, r2t, pool_idx, seq_lens, prefix, extend,
                                     scaling=dim**-0.5, enable_gqa=True, causal=True)
        assert (kernel.calls, kernel.extend_calls) == (calls, extend_calls + 1)


def test_extend_kernel_rows_do_not_depend_on_what_was_cached_or_batched(paths):
    """A prompt's rows come out bit-identical whether it is prefilled whole, or extended after 3, 37
    or 100 cached tokens, alone or with other requests in the step: each row's result depends only
    on its query and the keys up to its position (on each path)."""
    kernel = _extend_kernel(paths)
    heads, kv_heads, dim, total = 9, 3, 64, 150
    q_all = torch.randn(total, heads, dim, generator=torch.Generator().manual_seed(41)).to(torch.bfloat16)
    context = torch.randperm(total, generator=torch.Generator().manual_seed(42)) + 1
    k, v, *_ = _extend_batch([(0, total)], heads, kv_heads, dim, seed=43, contexts=[context])
    _, new = _backends()
    results = []
    for cached, others in [(0, 0), (3, 0), (37, 0), (100, 0), (37, 2)]:
        plan = [(cached, total - cached)] + [(20, 10)] * others
        contexts = [context] + [torch.arange(200 + 30 * i, 230 + 30 * i) for i in range(others)]
        _, _, r2t, pool_idx, seq_lens, prefix, extend = _extend_batch(plan, heads, kv_heads, dim, seed=44, contexts=contexts)
        q = torch.cat([q_all[cached:], torch.zeros(10 * others, heads, dim, dtype=torch.bfloat16)])
        new._extends = None
        out = new._run_sdpa_forward_extend(q, torch.zeros_like(q), k, v, r2t, pool_idx, seq_lens, prefix, extend,
                                           scaling=dim**-0.5, enable_gqa=True, causal=True)
        results.append((cached, out[: total - cached]))
    whole = results[0][1]
    for cached, out in results[1:]:
        assert torch.equal(out, whole[cached:]), cached
    assert kernel.extend_calls >= 5


def test_decode_kernel_takes_only_what_it_computes():
    kernel = _kernel_or_skip()
    q = torch.zeros(2, 9, 64, dtype=torch.bfloat16)
    pool = torch.zeros(10, 3, 64, dtype=torch.bfloat16)
    assert kernel.takes(q, torch.zeros_like(q), pool, pool)
    assert not kernel.takes(q.float(), torch.zeros_like(q).float(), pool.float(), pool.float())  # fp32 model
    q32 = torch.zeros(2, 9, 32, dtype=torch.bfloat16)
    assert not kernel.takes(q32, torch.zeros_like(q32), pool[..., :32], pool[..., :32])  # head dim 32
    q27 = torch.zeros(2, 27, 64, dtype=torch.bfloat16)
    assert not kernel.takes(q27, torch.zeros_like(q27), pool, pool)  # 9 query heads per KV head
    wide = torch.zeros(2, 9, 128, dtype=torch.bfloat16)[..., :64]
    assert not kernel.takes(wide, torch.zeros_like(q), pool, pool)  # heads not dense
    # a query taken from a fused qkv row (rows further apart than heads x dim) is fine
    qkv = torch.zeros(2, 15 * 64, dtype=torch.bfloat16)
    assert kernel.takes(qkv[:, : 9 * 64].view(2, 9, 64), torch.zeros_like(q), pool, pool)


def test_decode_kernel_turned_off_unbuildable_or_built_by_a_wrapped_cc(monkeypatch, tmp_path):
    monkeypatch.setenv(native.ENV, "sdpa")
    assert native.load.__wrapped__() == "turned off (INFERENCE_CPU_ATTENTION_KERNEL=false)"
    monkeypatch.setenv(native.ENV, "native")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    if any(f not in native._cpu_flags() for f in native.BUILD_CPU_FEATURES):
        assert native.load.__wrapped__().startswith(("the CPU lacks", "needs x86-64"))
        return
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    reason = native.load.__wrapped__()
    assert isinstance(reason, str) and reason.startswith("build failed: false failed"), reason
    assert list((tmp_path / "agent-runtime" / "kernels").iterdir()) == []  # no partial library left behind
    # $CC with a wrapper and options is split like a shell would: this one builds
    monkeypatch.setenv("CC", f"env LC_ALL=C {native.shutil.which('cc') or 'gcc'} -DAGENT_RT_TEST=1")
    built = native.load.__wrapped__()
    assert not isinstance(built, str), built
    assert built.path.parent == tmp_path / "agent-runtime" / "kernels" and built.path.exists()


@pytest.mark.engine
async def test_the_cpu_engine_attends_decode_steps_with_the_kernel(backend):
    # Read back from the scheduler process: the kernel was built and loaded there, and it ran the
    # attention of a request this test makes (30 layers x 7 decode steps, or more).
    if backend.info.device != "cpu":
        pytest.skip("the decode attention kernel is for CPU engines")
    if any(f not in native._cpu_flags() for f in native.BUILD_CPU_FEATURES):
        assert backend.info.extra["cpu_attention_kernel"].startswith("sdpa (")
        pytest.skip("this CPU has no AVX2")
    assert backend.info.extra["cpu_attention_kernel"] == "native"
    # a prompt no other test sends (not cached), of more rows than the decode kernel takes as an extend
    prompt = "The extend kernel test: " + " ".join(f"item {i}," for i in range(cpu_attention.SMALL_EXTEND + 4))
    before, after = await plugin_report_around_request(backend, "cpu_attention_kernel", new_tokens=8, prompt=prompt)
    assert after["runs"] and after["calls"] >= before["calls"] + 7 * 30
    # and its prefill, every layer (AVX-512 BF16, or fp32 on AVX2)
    assert after["extend"]
    assert after["extend_calls"] >= before["extend_calls"] + 30
    # where this host grants AMX tiles (as this process finds), the scheduler attends on them
    here = native.load()
    assert not isinstance(here, str) and after["amx"] == here.attention_amx()
