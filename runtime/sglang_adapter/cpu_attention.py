"""Prefix-aware SDPA attention for SGLang's CPU engine.

SGLang's `torch_native` attention backend (what a CPU without Intel AMX kernels runs) computes
an extend step as if nothing were cached: for a request with P cached tokens and N new ones it
builds an (P+N)-row query and runs causal attention over all P+N rows, then keeps the last N.
A cache hit therefore still costs quadratic attention over the whole context: measured on
2 cores, 20 new tokens after a 2,000-token cached prefix took 1.2 s of attention (30 layers),
the same as computing the 2,000 tokens from scratch. For an agent turn that is most of its
time to first token, and it hides what the radix cache saves.

`PrefixSDPABackend` keeps SGLang's backend and changes two things:
- extend: only the N new rows are queried, against the P+N keys, with the causal mask offset
  by P (the first prefill, P = 0, is SDPA's own causal kernel);
- both paths hand grouped-query attention to SDPA as `[kv_heads, group x rows]` queries
  against the un-repeated keys, instead of `enable_gqa`, which on CPU took the slow path.
Measured on the same shapes (9 query / 3 KV heads, 30 layers): extend 1,224 -> 34 ms, one
decode step over 2,000 tokens 47 -> 15 ms per request.

A decode batch attends a shared prefix once. The requests of one agent share its system prompt
and tools, and the radix cache keeps one copy of that prefix in the KV pool, at the same slots
for all of them. Per step (init_forward_metadata, once for all layers) the batch is grouped by
the slots its requests share (`decode_plan`); each layer then runs, per group, one SDPA call of
all the group's query rows against the shared prefix (sliced from the pool when its slots are one
contiguous run, else gathered once for the group, not once per request) and one batched call
against each request's own tokens (padded, masked), and merges the two by their log-sum-exp.
Requests that share no prefix long enough (MIN_SHARED_PREFIX) are decoded one by one as before.

Where the compiled kernel is available (runtime.sglang_adapter.native: AVX-512 BF16, or AVX2 and FMA;
a C compiler; bf16 model, head dim 64 or 128), a decode step's attention is
one call per layer for the whole batch instead: the same grouping, as lists of slots (each shared
prefix once, attended by all its requests; each request's own tokens), read from the pool in place.
It is 3-10x faster than the SDPA calls on the benchmark's shapes and closer to a float64 reference
(docs/BENCHMARKS.md). An extend step's attention is then one call per layer too: each request's new
rows against its context's keys, causal, K and V packed once per layer (on AVX-512 BF16 2-3x faster
than the SDPA calls, a turn's prefill after a cached prefix 1.7-2.3x faster end to end; on AVX2, on
fp32 FMAs, 1.3-2.1x). Its rows depend only on their queries and the keys up to their positions: a
prompt's prefill gives the same result however much of it was cached and whatever else was in the
step. On AVX2, an extend whose requests have up to SMALL_EXTEND new rows each (a span jump-forward
appended) is one call of the decode kernel per layer instead, which reads the pool in place: each
request's cached slots as a list attended by all its new rows, and each new slot as a list
attended by its own row and the rows after it (`small_extend_lists`).

Anything else (sliding windows, cross-attention, encoder-only layers, encoder lengths) goes to
SGLang's implementation unchanged. The backend is installed by runtime.sglang_adapter.plugin in the
engine's own processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from torch.nn.functional import scaled_dot_product_attention as sdpa

from runtime.sglang_adapter import native

# Queries per SDPA call in one extend: bounds the mask and any fallback score matrix
# (group x QUERY_BLOCK rows x context columns) for long prompts.
QUERY_BLOCK = 1024
# New rows per request up to which an extend step is attended by the decode kernel where the extend
# kernel computes on fp32 (AVX2): a forced span appended by jump-forward. The decode kernel reads the
# pool in place; the extend kernel first packs every context's K and V, which costs more than a few
# rows' attention (docs/BENCHMARKS.md, "eleventh round").
SMALL_EXTEND = 8
# Tokens two or more decoding requests must share (same KV slots) to be attended as one group.
MIN_SHARED_PREFIX = 32
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # SDPA that also returns the log-sum-exp


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[n, H, D] -> [1, kv_heads, group * n, D], rows ordered (group, token)."""
    n, heads, dim = q.shape
    group = heads // kv_heads
    return q.view(n, kv_heads, group, dim).permute(1, 2, 0, 3).reshape(1, kv_heads, group * n, dim)


def _ungrouped(out: torch.Tensor, n: int) -> torch.Tensor:
    """[1, kv_heads, group * n, Dv] -> [n, H, Dv]."""
    _, kv_heads, rows, dim = out.shape
    group = rows // n
    return out.view(kv_heads, group, n, dim).permute(2, 0, 1, 3).reshape(n, kv_heads * group, dim)


@dataclass
class _Group:
    """Decoding requests that share a prefix of KV slots."""

    members: torch.Tensor  # batch indices
    prefix: slice | torch.Tensor  # the shared slots: a contiguous run, or their indices
    own: torch.Tensor  # [members, longest own part] each member's slots after the prefix, padded
    own_mask: torch.Tensor  # [members, 1, 1, longest own part]: 0 where a slot is the member's, -inf where padding


@dataclass
class DecodePlan:
    """How one decode step's batch is attended (the same for every layer of the step)."""

    key: tuple[int, int]  # ids of (req_pool_indices, seq_lens) it was made for
    groups: list[_Group]
    singles: list[tuple[int, slice | torch.Tensor]]  # (batch index, its slots): decoded alone
    lists: native.Lists | None = None  # the same, as the compiled kernel takes it (groups, singles empty)


def _take(cache: torch.Tensor, slots: slice | torch.Tensor) -> torch.Tensor:
    """The pool's rows at `slots`: a view for a contiguous run, else one index_select (on CPU about
    10x faster than advanced indexing `cache[slots]` for these shapes: 8 x 1,000 slots of a
    [slots, 3, 64] bf16 pool, 57 us against 614)."""
    if isinstance(slots, slice):
        return cache[slots]
    return torch.index_select(cache, 0, slots.reshape(-1)).view(*slots.shape, *cache.shape[1:])


def _heads_first(cache: torch.Tensor, slots: slice | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One request's (or a shared prefix's) K or V as SDPA takes them: [1, Hkv, n, D]."""
    return _take(cache, slots).to(dtype).transpose(0, 1).unsqueeze(0)


def _run(slots: torch.Tensor) -> slice | torch.Tensor:
    """Slots as a slice of the pool when they are one ascending contiguous run (a view, no copy)."""
    n = slots.numel()
    first, last = int(slots[0]), int(slots[-1])
    if last - first == n - 1 and (n == 1 or bool((slots[1:] - slots[:-1] == 1).all())):
        return slice(first, last + 1)
    return slots


def decode_plan(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                dtype: torch.dtype, *, lists: bool = False) -> DecodePlan:
    """Group a decode batch by the KV slots its requests share from the start (see module doc);
    `lists`: as the compiled kernel's lists."""
    rows = [req_to_token[p, :t] for p, t in zip(req_pool_indices.tolist(), seq_lens.tolist(), strict=True)]
    clusters = _clusters(rows)
    key = (id(req_pool_indices), id(seq_lens))
    if lists:
        parts: list[tuple[torch.Tensor, list[int]]] = []
        for base, members, shared in clusters:
            if len(members) < 2:
                parts += [(rows[i], [i]) for i in members]
            else:
                parts += [(base[:shared], members), *((rows[i][shared:], [i]) for i in members)]
        return DecodePlan(key, [], [], native.Lists.build(parts))
    groups: list[_Group] = []
    singles: list[tuple[int, slice | torch.Tensor]] = []
    for base, members, shared in clusters:
        if len(members) < 2:
            singles += [(i, _run(rows[i])) for i in members]
            continue
        own = [rows[i][shared:] for i in members]
        longest = max(o.numel() for o in own)
        own_slots = torch.stack([torch.cat([o, o[-1:].expand(longest - o.numel())]) for o in own])
        mask = torch.zeros(len(members), 1, 1, longest, dtype=dtype)
        for r, o in enumerate(own):
            mask[r, 0, 0, o.numel():] = float("-inf")
        groups.append(_Group(torch.tensor(members), _run(base[:shared]), own_slots, mask))
    return DecodePlan(key, groups, singles)


def small_extend_lists(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                       extend_seq_lens: torch.Tensor) -> native.Lists:
    """An extend step as the decode kernel's lists, causal: a request's cached slots attended by
    all its new rows, and each new slot by its own row and the rows after it."""
    parts: list[tuple[torch.Tensor, list[int]]] = []
    row = 0
    for pool_idx, total, new in zip(req_pool_indices.tolist(), seq_lens.tolist(), extend_seq_lens.tolist(),
                                    strict=True):
        if not new:
            continue
        slots = req_to_token[pool_idx, :total]
        rows = list(range(row, row + new))
        if total > new:
            parts.append((slots[: total - new], rows))
        parts += [(slots[total - new + j : total - new + j + 1], rows[j:]) for j in range(new)]
        row += new
    return native.Lists.build(parts)


def extend_plan(kernel: native.Kernel, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                seq_lens: torch.Tensor, extend_seq_lens: torch.Tensor) -> native.Extends | native.Lists:
    """An extend step as the extend kernel takes it or, where that kernel packs K and V to fp32 (AVX2)
    and no request has more than SMALL_EXTEND new rows, as the decode kernel's lists."""
    if kernel.extend_fp32 and int(extend_seq_lens.max()) <= SMALL_EXTEND:
        return small_extend_lists(req_to_token, req_pool_indices, seq_lens, extend_seq_lens)
    return native.Extends.build(req_to_token, req_pool_indices, seq_lens, extend_seq_lens)


def _clusters(rows: list[torch.Tensor]) -> list[tuple[torch.Tensor, list[int], int]]:
    """[(first request's slots, members, tokens all members share)] for a batch's slot rows."""
    # Clusters of requests whose slots agree on at least MIN_SHARED_PREFIX leading tokens with the
    # cluster's first request. (Agents' prompts often share a short header too, the template's
    # system preamble: grouping by the first slot alone would put every request in one group
    # whose common part is that header.)
    clusters: list[tuple[torch.Tensor, list[int], int]] = []
    for i, row in enumerate(rows):
        for c, (base, members, shared) in enumerate(clusters):
            n = min(base.numel(), row.numel()) - 1  # each request keeps at least its newest token
            same = row[:n] == base[:n]
            lcp = n if bool(same.all()) else int(same.to(torch.int8).argmin())
            if lcp >= MIN_SHARED_PREFIX:
                clusters[c] = (base, [*members, i], min(shared, lcp))
                break
        else:
            clusters.append((row, [i], row.numel() - 1))
    return clusters


class PrefixSDPABackend(TorchNativeAttnBackend):
    """SGLang's torch_native backend with prefix-aware extend and grouped SDPA (see module doc)."""

    _plan: DecodePlan | None = None  # this step's decode plan (init_forward_metadata clears it)
    _extends: tuple[tuple[int, ...], native.Extends | native.Lists] | None = None  # this step's extend, as a kernel takes it

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Built (once per machine) and loaded with the backend, in the scheduler that uses it: not
        # in the first decode step, and not in SGLang's other processes, which also load plugins.
        native.load()

    def _run_sdpa_forward_extend(
        self,
        query: torch.Tensor,
        output: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        req_to_token: torch.Tensor,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        extend_prefix_lens: torch.Tensor,
        extend_seq_lens: torch.Tensor,
        encoder_lens: torch.Tensor | None = None,
        scaling=None,
        enable_gqa=False,
        causal=False,
        is_cross_attn=False,
        sliding_window_size: int | None = None,
    ):
        if encoder_lens is not None or is_cross_attn or not causal or (sliding_window_size or -1) > -1:
            return super()._run_sdpa_forward_extend(
                query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, extend_prefix_lens,
                extend_seq_lens, encoder_lens, scaling=scaling, enable_gqa=enable_gqa, causal=causal,
                is_cross_attn=is_cross_attn, sliding_window_size=sliding_window_size)
        kernel = native.load()
        if not isinstance(kernel, str) and kernel.takes_extend(query, output, k_cache, v_cache):
            key = (id(req_pool_indices), id(seq_lens), id(extend_seq_lens))
            if self._extends is None or self._extends[0] != key:  # once per step, not per layer
                self._extends = (key, extend_plan(kernel, req_to_token, req_pool_indices, seq_lens, extend_seq_lens))
            plan = self._extends[1]
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            if isinstance(plan, native.Lists):
                return kernel.attend(query, output, k_cache, v_cache, plan, scale)
            return kernel.extend(query, output, k_cache, v_cache, plan, scale)
        kv_heads = k_cache.shape[1]
        start = 0
        for pool_idx, total, prefix, new in zip(req_pool_indices.tolist(), seq_lens.tolist(),
                                                extend_prefix_lens.tolist(), extend_seq_lens.tolist(), strict=True):
            if new == 0:
                continue
            tokens = req_to_token[pool_idx, :total]
            keys, values = _heads_first(k_cache, tokens, query.dtype), _heads_first(v_cache, tokens, query.dtype)
            for lo in range(0, new, QUERY_BLOCK):
                hi = min(new, lo + QUERY_BLOCK)
                q = query[start + lo : start + hi]  # [rows, H, D]
                visible = prefix + hi  # keys past the block's last row are masked anyway
                if prefix == 0 and lo == 0:
                    # plain causal prefill of this block: SDPA's causal kernel, GQA as heads
                    out = sdpa(q.transpose(0, 1).unsqueeze(0), keys[:, :, :visible], values[:, :, :visible],
                               is_causal=True, scale=scaling, enable_gqa=kv_heads != q.shape[1])
                    out = out.squeeze(0).transpose(0, 1)
                else:
                    rows = torch.arange(prefix + lo, prefix + hi)
                    mask = torch.arange(visible)[None, :] <= rows[:, None]  # [rows, visible]
                    group = q.shape[1] // kv_heads
                    out = sdpa(_grouped(q, kv_heads), keys[:, :, :visible], values[:, :, :visible],
                               attn_mask=mask.repeat(group, 1), scale=scaling)
                    out = _ungrouped(out, hi - lo)
                output[start + lo : start + hi] = out
            start += new
        return output

    def _run_sdpa_forward_decode(
        self,
        query: torch.Tensor,
        output: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        req_to_token: torch.Tensor,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        encoder_lens: torch.Tensor | None = None,
        scaling=None,
        enable_gqa=False,
        causal=False,
        is_cross_attn=False,
        sliding_window_size: int | None = None,
    ):
        if encoder_lens is not None or is_cross_attn or (sliding_window_size or -1) > -1:
            return super()._run_sdpa_forward_decode(
                query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, encoder_lens,
                scaling=scaling, enable_gqa=enable_gqa, causal=causal, is_cross_attn=is_cross_attn,
                sliding_window_size=sliding_window_size)
        kv_heads = k_cache.shape[1]
        kernel = native.load()
        use_kernel = not isinstance(kernel, str) and kernel.takes(query, output, k_cache, v_cache)
        plan = self._plan
        if plan is None or plan.key != (id(req_pool_indices), id(seq_lens)) or (plan.lists is not None) != use_kernel:
            plan = self._plan = decode_plan(req_to_token, req_pool_indices, seq_lens, query.dtype, lists=use_kernel)
        if plan.lists is not None and not isinstance(kernel, str):
            return kernel.attend(query, output, k_cache, v_cache, plan.lists,
                                 scaling if scaling is not None else query.shape[-1] ** -0.5)
        for group in plan.groups:
            output[group.members] = _attend_group(query[group.members], k_cache, v_cache, group, scaling).to(output.dtype)
        for i, tokens in plan.singles:
            keys, values = _heads_first(k_cache, tokens, query.dtype), _heads_first(v_cache, tokens, query.dtype)
            # one query row per head: the group's heads become the rows of their KV head
            out = sdpa(_grouped(query[i : i + 1], kv_heads), keys, values, scale=scaling)
            output[i : i + 1] = _ungrouped(out, 1)
        return output

    def init_forward_metadata(self, forward_batch: Any) -> None:
        super().init_forward_metadata(forward_batch)
        self._plan = None  # a new step: its decode plan is made by the first layer that needs it
        self._extends = None


def _attend_group(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: _Group,
                  scaling: float | None) -> torch.Tensor:
    """[R, H, D] queries of a group's R requests -> [R, H, Dv]: the shared prefix attended once
    for all of them, each request's own tokens in one padded batch, merged by log-sum-exp."""
    r, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    g = heads // kv_heads
    pk, pv = _heads_first(k_cache, group.prefix, q.dtype), _heads_first(v_cache, group.prefix, q.dtype)
    out_p, lse_p = _flash(_grouped(q, kv_heads), pk, pv, 0.0, False, scale=scaling)  # rows (g, r)
    dv = out_p.shape[-1]
    out_p = out_p.view(kv_heads, g, r, dv).permute(2, 0, 1, 3)  # [R, Hkv, g, Dv]
    lse_p = lse_p.view(kv_heads, g, r).permute(2, 0, 1)
    ok = _take(k_cache, group.own).to(q.dtype).permute(0, 2, 1, 3)  # [R, Hkv, S, D]
    ov = _take(v_cache, group.own).to(q.dtype).permute(0, 2, 1, 3)
    out_o, lse_o = _flash(q.view(r, kv_heads, g, dim), ok, ov, 0.0, False, attn_mask=group.own_mask.to(q.dtype), scale=scaling)
    top = torch.maximum(lse_p, lse_o)
    wp, wo = (lse_p - top).exp().unsqueeze(-1), (lse_o - top).exp().unsqueeze(-1)
    merged = (out_p.float() * wp + out_o.float() * wo) / (wp + wo)
    return merged.reshape(r, heads, dv)
