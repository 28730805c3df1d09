"""The compiled CPU kernels (decode_attention.c: attention of decode and extend steps; small_gemm.c:
the linear layers of decode steps, of every step on AVX2 hosts): built on first use into one library, loaded by ctypes.

A CPU decode step's attention reads every request's K and V once per layer. PyTorch's SDPA
needs them gathered out of the paged pool into dense tensors first (own parts padded to the
longest), and its CPU flash kernel packs them again for a GEMM; measured on the benchmark's
shapes it moved K/V at 5-9 GB/s. decode_attention.c reads the pool's rows where they are, once,
and attends all query heads of a KV head together (see its header; docs/BENCHMARKS.md). Its extend
kernel packs each request's K and V once per layer (into the layouts of VDPBF16PS, or widened to
fp32 on AVX2) and computes the new rows in tiles of 48 query vectors against blocks of 32 keys
(2-3x faster than SDPA's CPU flash attention on the benchmark's prefills with AVX-512 BF16, 1.3-2.1x
on AVX2). small_gemm.c multiplies a decode step's few rows by weights
packed for it (runtime.sglang_adapter.cpu_linear), reading each weight line once. Where the CPU has
Intel AMX and the OS grants this process the tiles, the attention kernels compute shared prefixes
and prefills on AMX tiles too (Kernel.attention_amx(); AGENT_RUNTIME_CPU_ATTENTION_TILES=off keeps
them off, for measurements).

It is compiled from the sources next to this file by the system C compiler (`cc`, or $CC) with
`-O3 -march=native -fopenmp` into $XDG_CACHE_HOME/agent-runtime/kernels (~/.cache/...), keyed by
the source, the compiler, the flags and the CPU's feature flags, so a second start loads it at
once. OpenMP: the library links libgomp by its soname, so in a process that has imported torch
it shares torch's own OpenMP runtime and thread pool.

The attention kernels run on bf16 dot products on an x86-64 CPU with AVX-512 BF16, on fp32 FMAs on
one with only AVX2 and FMA. The GEMM runs on
AMX tiles where the CPU has them; on a CPU with AVX2 and FMA but neither AMX nor the AVX-512 that
oneDNN's bf16 GEMMs need (an AMD EPYC of the Zen 3 generation, say), it runs on AVX2 FMAs for any
number of rows, prefills included: there PyTorch multiplies bf16 with a slow generic loop
(docs/BENCHMARKS.md, "eighth round"). The library builds from both sources on any CPU with AVX2 and
FMA; what the CPU lacks compiles to functions that refuse every call. Where a kernel cannot run,
`load()` (attention) and `load_gemm()` (linear layers) say why, and the attention backend keeps
PyTorch's SDPA, the linear layers oneDNN (or SGLang's own path where oneDNN has no bf16).
INFERENCE_CPU_ATTENTION_KERNEL=false (AGENT_RUNTIME_CPU_ATTENTION_KERNEL=sdpa here) and
INFERENCE_CPU_GEMM_KERNEL=false (AGENT_RUNTIME_CPU_GEMM_KERNEL=onednn) turn each use off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("runtime.sglang_adapter.native")

ENV = "AGENT_RUNTIME_CPU_ATTENTION_KERNEL"  # "native" (default) or "sdpa"; set by runtime.backends.embedded
GEMM_ENV = "AGENT_RUNTIME_CPU_GEMM_KERNEL"  # "native" (default) or "onednn"; set by runtime.backends.embedded
# "off": attention keeps VDPBF16PS and fp32 FMAs where AMX tiles are granted (for measurements)
TILES_ENV = "AGENT_RUNTIME_CPU_ATTENTION_TILES"
SOURCES = tuple(Path(__file__).resolve().with_name(name) for name in ("decode_attention.c", "small_gemm.c"))
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
ABI_VERSION = 6
GEMM_CPU_FEATURES = ("amx_tile", "amx_bf16")  # the GEMM on AMX tiles
BUILD_CPU_FEATURES = ("avx2", "fma")  # the library at all, and the GEMM on AVX2 where oneDNN has no bf16
GEMM_MAX_ROWS = 16  # on AMX tiles; the AVX2 GEMM takes any number
BUILD_TIMEOUT_S = 300

_P, _I = ctypes.c_void_p, ctypes.c_int64


@dataclass(frozen=True)
class Lists:
    """One decode step's batch as the kernel takes it: list l attends the query rows
    rows[row_start[l]:row_start[l+1]] (batch indices) to the KV slots slots[key_start[l]:key_start[l+1]]."""

    slots: torch.Tensor  # int32
    key_start: torch.Tensor  # int64 [L + 1]
    rows: torch.Tensor  # int32
    row_start: torch.Tensor  # int64 [L + 1]

    @classmethod
    def build(cls, lists: list[tuple[torch.Tensor, list[int]]]) -> Lists:
        """From [(slots, batch rows)], in order."""
        keys = torch.tensor([0] + [s.numel() for s, _ in lists], dtype=torch.int64).cumsum(0)
        rows = torch.tensor([0] + [len(r) for _, r in lists], dtype=torch.int64).cumsum(0)
        return cls(torch.cat([s.reshape(-1) for s, _ in lists]).to(torch.int32), keys,
                   torch.tensor([r for _, rs in lists for r in rs], dtype=torch.int32), rows)


@dataclass(frozen=True)
class Extends:
    """One extend step's requests as the kernel takes them: request r's context is the KV slots
    slots[slot_start[r]:slot_start[r+1]] in order, its last n_new[r] positions are new, and their
    queries are rows q_row[r]... of the step's query."""

    slots: torch.Tensor  # int32
    slot_start: torch.Tensor  # int64 [R + 1]
    n_new: torch.Tensor  # int64 [R]
    q_row: torch.Tensor  # int64 [R]
    rows: int  # query rows the step's requests hold

    @classmethod
    def build(cls, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
              extend_seq_lens: torch.Tensor) -> Extends:
        contexts, news, starts, row = [], [], [], 0
        for pool_idx, total, new in zip(req_pool_indices.tolist(), seq_lens.tolist(), extend_seq_lens.tolist(),
                                        strict=True):
            if new:
                contexts.append(req_to_token[pool_idx, :total])
                news.append(new)
                starts.append(row)
            row += new
        lengths = torch.tensor([0] + [c.numel() for c in contexts], dtype=torch.int64)
        slots = torch.cat(contexts).to(torch.int32) if contexts else torch.zeros(0, dtype=torch.int32)
        return cls(slots, lengths.cumsum(0), torch.tensor(news, dtype=torch.int64),
                   torch.tensor(starts, dtype=torch.int64), row)


class Kernel:
    """The loaded library."""

    def __init__(self, path: Path):
        self.path = path
        lib = ctypes.CDLL(str(path))
        if lib.agent_rt_abi_version() != ABI_VERSION:
            raise OSError(f"{path.name}: ABI version {lib.agent_rt_abi_version()}, expected {ABI_VERSION}")
        self._supports = lib.agent_rt_supports
        self._supports.argtypes, self._supports.restype = [_I, _I], ctypes.c_int
        self._attend = lib.agent_rt_decode_attention
        self._attend.argtypes = [_P, _I, _P, _P, _I, _P, _P, _P, _P, _I, _I, _I, _I, _I, ctypes.c_float, _P, _I]
        self._attend.restype = ctypes.c_int
        self._extend = lib.agent_rt_extend_attention
        self._extend.argtypes = [_P, _I, _P, _P, _I, _P, _P, _P, _P, _I, _I, _I, _I, ctypes.c_float, _P, _I]
        self._extend.restype = ctypes.c_int
        self._gemm = lib.agent_rt_small_gemm
        self._gemm.argtypes = [_P, _I, _I, _P, _I, _I, _P, _P, _I]
        self._gemm.restype = ctypes.c_int
        self._gemm_ready = lib.agent_rt_small_gemm_ready
        self._gemm_ready.restype = ctypes.c_int
        self._attention_amx = lib.agent_rt_attention_amx
        self._attention_amx.argtypes, self._attention_amx.restype = [ctypes.c_int], ctypes.c_int
        self.gemm_max_rows = int(lib.agent_rt_gemm_max_rows())
        # the extend kernel: on VDPBF16PS (AVX-512 BF16) or on fp32 FMAs (AVX2), K and V packed per call
        form = int(lib.agent_rt_extend_ready())
        self.extend_ready = form != 0
        self.extend_fp32 = form == 2
        self.calls = 0
        self.extend_calls = 0
        self.gemm_calls = 0

    def takes(self, q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
        """Whether these tensors are what the kernel computes on: bf16 throughout, [rows, heads, D]
        with dense heads, a [slots, kv_heads, D] pool shared by K and V in layout, D of 64 or 128,
        up to 8 query heads per KV head."""
        if not (q.dtype == out.dtype == k_cache.dtype == v_cache.dtype == torch.bfloat16):
            return False
        if q.dim() != 3 or out.dim() != 3 or k_cache.dim() != 3 or q.device.type != "cpu":
            return False
        rows, heads, dim = q.shape
        kv_heads = k_cache.shape[1]
        return (out.shape == q.shape and k_cache.shape == v_cache.shape and k_cache.shape[2] == dim
                and heads % kv_heads == 0 and bool(self._supports(heads // kv_heads, dim))
                and q.stride()[1:] == (dim, 1) and out.stride()[1:] == (dim, 1)
                and k_cache.stride() == v_cache.stride() and k_cache.stride()[1:] == (dim, 1))

    def takes_extend(self, q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
        """Whether the extend kernel runs here and computes on these tensors (as takes())."""
        return self.extend_ready and self.takes(q, out, k_cache, v_cache)

    def attend(self, q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               lists: Lists, scale: float) -> torch.Tensor:
        """out[r] = softmax attention of q[r] over the union of the lists holding row r (see takes())."""
        rows, heads, dim = q.shape
        kv_heads = k_cache.shape[1]
        rc = self._attend(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0),
                          lists.slots.data_ptr(), lists.key_start.data_ptr(), lists.rows.data_ptr(),
                          lists.row_start.data_ptr(), lists.key_start.numel() - 1, rows, kv_heads,
                          heads // kv_heads, dim, scale, out.data_ptr(), out.stride(0))
        if rc != 0:
            raise MemoryError("decode attention kernel: out of memory")
        self.calls += 1
        return out

    def extend(self, q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               extends: Extends, scale: float) -> torch.Tensor:
        """The new rows' causal attention over their contexts, into out (see takes())."""
        heads, dim = q.shape[1], q.shape[2]
        kv_heads = k_cache.shape[1]
        if extends.rows > q.shape[0] or out.shape[0] < q.shape[0]:  # the C code trusts these bounds
            raise ValueError(f"extend attention: {extends.rows} new rows for a query of {q.shape[0]}")
        rc = self._extend(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0),
                          extends.slots.data_ptr(), extends.slot_start.data_ptr(), extends.n_new.data_ptr(),
                          extends.q_row.data_ptr(), extends.n_new.numel(), kv_heads, heads // kv_heads, dim, scale,
                          out.data_ptr(), out.stride(0))
        if rc != 0:
            raise MemoryError("extend attention kernel: out of memory")
        self.extend_calls += 1
        return out

    def attention_amx(self, want: bool | None = None) -> bool:
        """Whether attention (decode and extend) runs on AMX tiles (where the CPU has AMX and the OS
        grants the tiles); want turns that on or off for this process first."""
        return bool(self._attention_amx(-1 if want is None else int(want)))

    def gemm_ready(self) -> bool:
        """Whether this process can run the GEMM: the library was built for AMX and the OS grants this
        process the tile state (asked once), or it was built for AVX2 without AMX."""
        return bool(self._gemm_ready())

    def gemm(self, rows: torch.Tensor, blocks: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """rows [m, k] (bf16, 1 <= m <= gemm_max_rows, inputs dense) @ W^T (+ bias) -> new [m, n] bf16,
        W packed as cpu_linear.pack_blocks does: blocks [n/16, k/2, 16, 2] bf16, k a multiple of 32."""
        m, k = rows.shape
        n = blocks.shape[0] * 16
        if (rows.dtype != torch.bfloat16 or rows.stride(1) != 1 or not 1 <= m <= self.gemm_max_rows
                or blocks.dtype != torch.bfloat16 or not blocks.is_contiguous()
                or tuple(blocks.shape[1:]) != (k // 2, 16, 2) or k % 32
                or (bias is not None and (bias.dtype != torch.bfloat16 or bias.shape != (n,) or not bias.is_contiguous()))):
            raise ValueError(f"small GEMM: rows {tuple(rows.shape)} {rows.dtype} against blocks {tuple(blocks.shape)}")
        out = torch.empty(m, n, dtype=torch.bfloat16)
        rc = self._gemm(rows.data_ptr(), m, rows.stride(0), blocks.data_ptr(), n, k,
                        None if bias is None else bias.data_ptr(), out.data_ptr(), n)
        if rc == 2:
            raise MemoryError("small GEMM: out of memory")
        if rc != 0:
            raise ValueError(f"small GEMM: shape refused ({m} x {k} by {n})")
        self.gemm_calls += 1
        return out


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "agent-runtime" / "kernels"


def _build(compiler: str, flags: set[str]) -> Path:
    cc = shlex.split(compiler)  # $CC may carry a wrapper or options ("ccache gcc")
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    texts = [source.read_text() for source in SOURCES]
    key = hashlib.sha256("\0".join([*texts, compiler, version, *FLAGS, *sorted(flags)]).encode()).hexdigest()
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / "agent-runtime-kernels"):
        target = folder / f"kernels-{key[:16]}.so"
        if target.exists():
            return target
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
            os.close(fd)
        except OSError:
            continue
        try:
            log.info("building the CPU kernels (%s, once for this machine)", compiler)
            done = subprocess.run([*cc, *FLAGS, "-o", tmp, *map(str, SOURCES)], capture_output=True, text=True,
                                  timeout=BUILD_TIMEOUT_S)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise RuntimeError(f"{compiler} failed: {last}")
            os.replace(tmp, target)  # atomic: concurrent builders each write a whole file
            return target
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"no writable folder for the kernel (tried {_cache_dir()})")


@functools.cache
def load() -> Kernel | str:
    """The kernels for attention, or why this process attends with SDPA instead (built once per machine)."""
    if os.environ.get(ENV, "native") == "sdpa":
        return "turned off (INFERENCE_CPU_ATTENTION_KERNEL=false)"
    kernel = _library()
    if not isinstance(kernel, str) and os.environ.get(TILES_ENV) == "off":
        kernel.attention_amx(False)
    return kernel


@functools.cache
def load_gemm() -> Kernel | str:
    """The kernels for decode steps' linear layers, or why this process keeps oneDNN for them."""
    if os.environ.get(GEMM_ENV, "native") == "onednn":
        return "turned off (INFERENCE_CPU_GEMM_KERNEL=false)"
    flags = _cpu_flags()
    amx = all(f in flags for f in GEMM_CPU_FEATURES)
    if not amx and onednn_bf16():
        return "the CPU has no Intel AMX, and oneDNN multiplies bf16 on it"
    kernel = _library()
    if not isinstance(kernel, str) and not kernel.gemm_ready():
        return "the OS does not grant this process AMX tiles, or the library was built without them"
    return kernel


@functools.cache
def onednn_bf16() -> bool:
    """Whether oneDNN multiplies bf16 on this CPU (PyTorch's mkldnn bf16 linears need AVX-512 BW/VL/DQ
    or AVX-NE-CONVERT); asked once, by packing a small weight."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 32, dtype=torch.bfloat16))
    except RuntimeError:
        return False
    return True


_OPENED: dict[Path, Kernel] = {}  # one Kernel (and its call counts) per library file


def _library() -> Kernel | str:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"needs x86-64 (this is {platform.machine()})"
    flags = _cpu_flags()
    missing = [f for f in BUILD_CPU_FEATURES if f not in flags]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return "no C compiler (cc) to build it"
    try:
        path = _build(compiler, flags)
        if path not in _OPENED:
            _OPENED[path] = Kernel(path)
        return _OPENED[path]
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("CPU kernels unavailable: %s", exc)
        return f"build failed: {exc}"


def report() -> dict[str, object]:
    """For the scheduler's internal state: whether attention runs the kernel, its calls, whether extends
    run it too, and whether on AMX tiles."""
    kernel = load()
    if isinstance(kernel, str):
        return {"runs": False, "reason": kernel, "calls": 0, "extend_calls": 0, "extend": False, "amx": False}
    return {"runs": True, "reason": "", "calls": kernel.calls, "extend_calls": kernel.extend_calls,
            "extend": kernel.extend_ready, "amx": kernel.attention_amx()}


def gemm_report() -> dict[str, object]:
    """For the scheduler's internal state: whether decode steps' linear layers run the kernel, and its calls."""
    kernel = load_gemm()
    if isinstance(kernel, str):
        return {"runs": False, "reason": kernel, "calls": 0}
    return {"runs": True, "reason": "", "calls": kernel.gemm_calls}
