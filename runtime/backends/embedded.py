"""The embedded SGLang Engine: its arguments per device, its lifecycle, and its stream.

Gotchas handled here (see FINDINGS.md):
- SGLang must be imported after runtime.sglang_adapter.prepare() (CPU flag, sgl_kernel stand-in).
- Engine construction blocks for tens of seconds: it runs in a worker thread so the server
  answers /health meanwhile. Off the main thread SGLang installs no launch-phase signal
  handlers; its tokenizer manager later adds SIGTERM/SIGQUIT handlers to the serving loop,
  which would turn our graceful shutdown off (SIGTERM) and kill the whole host process when a
  child dies (SIGQUIT). Those are replaced: SIGTERM goes back to the host's handler, SIGQUIT
  (sent by SGLang's subprocess watchdog when a child dies) marks the engine dead.
- Engine.shutdown() kills every child process of the host; the server has no others.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from runtime.backends.base import BackendInfo, BackendUnavailable, GenRequest, GenUpdate, TokenBackend
from runtime.backends.sglang_output import to_update
from runtime.config import Config
from runtime.metrics import METRICS
from runtime.sglang_adapter import jump_forward
from runtime.sglang_adapter import plugin as sglang_plugin

log = logging.getLogger("runtime.backends.embedded")

CPU_DEFAULT_KV_TOKENS = 65536

# INFERENCE_ATTN_IMPLEMENTATION -> SGLang attention backend, per device (None: SGLang picks).
ATTENTION_BACKENDS: dict[str, dict[str, str | None]] = {
    "cpu": {"auto": "torch_native", "sdpa": "torch_native", "eager": "torch_native"},
    "cuda": {"auto": None, "flash_attention_2": "fa3", "sdpa": "torch_native", "eager": "torch_native"},
}
QUANTIZATION = {"none": None, "awq": "awq", "gptq": "gptq", "bnb-4bit": "bitsandbytes", "fp8": "fp8"}


def engine_kwargs(cfg: Config, model_path: str) -> dict[str, Any]:
    """The sglang.Engine arguments for this configuration (cfg.device already resolved)."""
    device = cfg.device
    dtype = cfg.dtype
    if cfg.quantization == "bnb-4bit":
        dtype = cfg.bnb_compute_dtype
    elif dtype == "auto" and device == "cpu":
        dtype = "bfloat16"
    kwargs: dict[str, Any] = {
        "model_path": model_path,
        "device": device,
        "dtype": dtype,
        "trust_remote_code": cfg.trust_remote_code,
        "disable_radix_cache": not cfg.radix_cache,
        "log_level": "error",
        # Tokens are the cost of a tool call: no whitespace padding inside constrained JSON.
        "constrained_json_disable_any_whitespace": True,
        "grammar_backend": "xgrammar",
        "random_seed": 0,
        # SGLang's own Prometheus metrics (cache hit rate, queue, token usage): its processes
        # write them to PROMETHEUS_MULTIPROC_DIR; the runtime's /metrics renders them too. Off by
        # default on CPU: collected on every scheduler step, they cost about a fifth of decode speed.
        "enable_metrics": cfg.engine_metrics == "on" or (cfg.engine_metrics == "auto" and device != "cpu"),
    }
    backend = ATTENTION_BACKENDS[device].get(cfg.attn_implementation)
    if backend:
        kwargs["attention_backend"] = backend
    if QUANTIZATION[cfg.quantization]:
        kwargs["quantization"] = QUANTIZATION[cfg.quantization]
    if cfg.context_length:
        kwargs["context_length"] = cfg.context_length
    if device == "cpu":
        kwargs["max_total_tokens"] = cfg.kv_cache_tokens or CPU_DEFAULT_KV_TOKENS
        kwargs["mem_fraction_static"] = 0.3
        kwargs["disable_cuda_graph"] = True
        # An idle scheduler otherwise polls in a busy loop: a whole core on a small CPU host, taken
        # from the server's own process (and any other engine); with this it waits on its sockets.
        kwargs["sleep_on_idle"] = True
        if cfg.jumps_mid_call:
            # runtime.sglang_adapter.jump_forward moves a request out of the batch after a step: with
            # the overlap scheduler the next step would hold it (no loss on CPU: BENCHMARKS, tenth round)
            kwargs["disable_overlap_schedule"] = True
    else:
        kwargs["mem_fraction_static"] = cfg.mem_fraction_static
        kwargs["disable_cuda_graph"] = not cfg.cuda_graph
        kwargs["tp_size"] = cfg.tp_size
        kwargs["dp_size"] = cfg.dp_size
        if cfg.kv_cache_tokens:
            kwargs["max_total_tokens"] = cfg.kv_cache_tokens
    return kwargs


async def _plugin_report(tm: Any, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """What runtime.sglang_adapter.plugin reports from the scheduler: the attention backend class
    it runs, how many layers run packed weights and what the CPU decode loop did (empty where the
    plugin is not loaded, e.g. on CUDA)."""
    try:
        states = await tm.get_internal_state()
    except Exception as exc:  # informational only
        log.debug("no internal state from the scheduler: %s", exc)
        return {}
    keys = keys or (sglang_plugin.STATE_KEY, sglang_plugin.PACKED_KEY, sglang_plugin.DECODE_KEY,
                    sglang_plugin.KERNEL_KEY, sglang_plugin.GEMM_KEY)
    return next(({k: s[k] for k in keys if k in s} for s in states if sglang_plugin.STATE_KEY in s), {})


def _which_path(state: Any, used: str, fallback: str, why: str) -> str:
    """How the engine runs one of the plugin's CPU paths, from its report {"runs", "reason"}:
    `used`, or `fallback` with the reason it does not run (`why` when the report gives none)."""
    if not isinstance(state, dict):
        return fallback
    return used if state.get("runs") else f"{fallback} ({state.get('reason') or why})"


class EmbeddedBackend(TokenBackend):
    """sglang.Engine in this process (its scheduler and detokenizer are child processes)."""

    def __init__(self, cfg: Config, *, on_dead: Callable[[str], None] | None = None):
        self._cfg = cfg
        self._engine: Any = None
        self._tokenizer: Any = None
        self._info: BackendInfo | None = None
        self._ready = False
        self._dead_reason: str | None = None
        self._on_dead = on_dead
        self._inflight: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._child_pids: set[int] = set()
        self.model_path: str | None = None
        self.startup_s: float | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def info(self) -> BackendInfo:
        if self._info is None:
            raise BackendUnavailable("the engine has not started")
        return self._info

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise BackendUnavailable("the engine has not started")
        return self._tokenizer

    def is_ready(self) -> bool:
        return self._ready and self._dead_reason is None

    async def start(self) -> None:
        from runtime.model_store import resolve_model
        from runtime.sglang_adapter import prepare

        started = time.monotonic()
        self._loop = asyncio.get_running_loop()
        env = prepare(self._cfg.device)
        path = await asyncio.to_thread(resolve_model, self._cfg.model_id, cache_dir=self._cfg.cache_dir)
        self.model_path = str(path)
        kwargs = engine_kwargs(self._cfg, self.model_path)
        attention = str(kwargs.get("attention_backend") or "sglang-default")
        if self._cfg.device == "cpu":
            from runtime.sglang_adapter import native

            # Read by runtime.sglang_adapter.plugin in the engine's processes (they inherit the environment).
            os.environ[sglang_plugin.ENV] = "prefix-sdpa" if self._cfg.attn_implementation == "auto" else "sglang"
            os.environ[sglang_plugin.LINEAR_ENV] = "packed" if self._cfg.cpu_packed_linears else "sglang"
            os.environ[sglang_plugin.DECODE_ENV] = "lean" if self._cfg.cpu_lean_decode else "sglang"
            os.environ[native.ENV] = "native" if self._cfg.cpu_attention_kernel else "sdpa"
            os.environ[native.GEMM_ENV] = "native" if self._cfg.cpu_gemm_kernel else "onednn"
            os.environ[jump_forward.ENV] = "on" if self._cfg.jumps_mid_call else "off"
        log.info("starting SGLang engine: %s", {k: v for k, v in kwargs.items() if k != "model_path"})
        metrics_dir = _prometheus_dir() if kwargs.get("enable_metrics") else None
        before = _children()
        if metrics_dir is not None:
            _forget_sglang_collectors()
        self._engine = await asyncio.to_thread(_construct_engine, kwargs)
        if metrics_dir is not None:
            METRICS.attach_multiprocess_dir(metrics_dir)
        self._child_pids = _children() - before  # this engine's processes, not the host's others
        tm = self._engine.tokenizer_manager
        saved = _current_handlers()
        tm.auto_create_handle_loop()  # binds SGLang's receive loop to this event loop
        self._reclaim_signals(saved)
        self._tokenizer = tm.tokenizer
        loads = await tm.get_loads()
        report = await _plugin_report(tm)
        attention_class = report.get(sglang_plugin.STATE_KEY)
        if attention_class and attention_class.endswith(".PrefixSDPABackend"):
            attention += "+prefix-sdpa"
        kv_tokens = int(loads[0].max_total_num_tokens) if loads else int(kwargs.get("max_total_tokens", 0))
        self._info = BackendInfo(
            name="embedded",
            model=self._cfg.model_id or "SmolLM2-135M-Instruct (embedded default)",
            device=self._cfg.device,
            dtype=str(kwargs["dtype"]),
            attention_backend=attention,
            context_length=int(tm.context_len),
            kv_capacity_tokens=kv_tokens,
            radix_cache=self._cfg.radix_cache,
            extra={"sgl_kernel": env["sgl_kernel"], "model_path": self.model_path, "attention_class": attention_class,
                   "packed_linear_layers": int(report.get(sglang_plugin.PACKED_KEY, 0)),
                   # decode steps: runtime.sglang_adapter.cpu_decode's loop, or SGLang's forward
                   "cpu_decode": _which_path(report.get(sglang_plugin.DECODE_KEY), "lean", "sglang", "not eligible"),
                   # decode attention: runtime.sglang_adapter.native's kernel, or SDPA
                   "cpu_attention_kernel": _which_path(report.get(sglang_plugin.KERNEL_KEY), "native", "sdpa",
                                                       "unavailable"),
                   # decode steps' linear layers: native's small-M GEMM, or oneDNN
                   "cpu_gemm_kernel": _which_path(report.get(sglang_plugin.GEMM_KEY), "native", "onednn",
                                                  "unavailable")},
        )
        self._ready = True
        self._dead_reason = None
        self.startup_s = time.monotonic() - started

    def _reclaim_signals(self, saved: dict[int, Any]) -> None:
        """Undo SGLang's loop signal handlers: SIGTERM goes back to the host's handler (uvicorn's
        graceful shutdown), SIGQUIT (SGLang's watchdog: a child died) marks the engine dead."""
        if threading.current_thread() is not threading.main_thread() or self._loop is None:
            return
        loop = self._loop
        for sig in (signal.SIGTERM, signal.SIGQUIT):
            try:
                loop.remove_signal_handler(sig)  # resets to SIG_DFL: restore below
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        if signal.SIGTERM in saved and saved[signal.SIGTERM] is not None:
            signal.signal(signal.SIGTERM, saved[signal.SIGTERM])
        try:
            loop.add_signal_handler(signal.SIGQUIT, self._child_died)
        except (NotImplementedError, RuntimeError):
            pass

    def _child_died(self) -> None:
        self.mark_dead("an SGLang engine process died")

    def mark_dead(self, reason: str) -> None:
        if self._dead_reason is not None:
            return
        self._dead_reason = reason
        self._ready = False
        log.error("engine unavailable: %s", reason)
        if self._on_dead is not None:
            self._on_dead(reason)

    def child_pids(self) -> list[int]:
        """The engine's processes (SGLang's scheduler, detokenizer and their helpers)."""
        return sorted(self._child_pids)

    def supervised(self) -> bool:
        return True

    def check_alive(self) -> bool:
        """Poll the engine's processes; marks the engine dead if one of them is gone."""
        if self._engine is None or self._dead_reason is not None:
            return False
        import psutil

        for pid in self._child_pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    continue
            except psutil.NoSuchProcess:
                pass
            self.mark_dead(f"SGLang process {pid} exited")
            return False
        return True

    async def stop(self) -> None:
        self._ready = False
        engine, self._engine = self._engine, None
        if engine is not None:
            await asyncio.to_thread(_shutdown_engine, engine)
            _clear_prometheus_dir(self._child_pids)  # the next engine starts from zero, not from stale gauges

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    # ------------------------------------------------------------------ generation
    def inflight(self) -> int:
        return len(self._inflight)

    async def stream(self, request: GenRequest) -> AsyncIterator[GenUpdate]:
        if not self.is_ready():
            raise BackendUnavailable(self._dead_reason or "the engine is not ready")
        engine = self._engine
        self._inflight.add(request.rid)
        finished = False
        try:
            gen = await engine.async_generate(
                input_ids=request.input_ids,
                sampling_params=request.sampling.to_sglang(),
                stream=True,
                rid=request.rid,
            )
            async for out in gen:
                update = to_update(out)
                finished = update.finish_reason is not None
                yield update
                if finished:
                    return
            if not finished and self._dead_reason is not None:
                raise BackendUnavailable(self._dead_reason)
        except (ConnectionError, EOFError, OSError) as exc:
            self.mark_dead(f"{type(exc).__name__}: {exc}")
            raise BackendUnavailable(str(exc)) from exc
        finally:
            self._inflight.discard(request.rid)
            if not finished:
                await self.abort(request.rid)

    async def abort(self, rid: str) -> None:
        engine = self._engine
        if engine is None:
            return
        try:
            engine.tokenizer_manager.abort_request(rid=rid)
        except Exception as exc:  # the engine may be gone; nothing left to free then
            log.debug("abort of %s failed: %s", rid, exc)

    async def engine_requests(self) -> int | None:
        if self._engine is None:
            return None
        loads = await self._engine.tokenizer_manager.get_loads()
        return sum(int(load.num_running_reqs) + int(load.num_waiting_reqs) for load in loads)

    async def flush_cache(self) -> bool:
        """Empty the radix cache (False while requests run: SGLang refuses then)."""
        if self._engine is None:
            return False
        out = await self._engine.tokenizer_manager.flush_cache()
        return bool(getattr(out, "success", out))

    async def jump_forward_counts(self) -> dict[str, int]:
        """The scheduler's jump-forward counts so far (runtime.sglang_adapter.jump_forward.STATS), or {}."""
        if self._engine is None:
            return {}
        report = await _plugin_report(self._engine.tokenizer_manager, (jump_forward.KEY,))
        return dict(report.get(jump_forward.KEY) or {})

    async def kv_tokens_in_use(self) -> int | None:
        if self._engine is None:
            return None
        loads = await self._engine.tokenizer_manager.get_loads()
        return sum(int(load.num_used_tokens) for load in loads)


_OWN_PROMETHEUS_DIR: str | None = None  # the directory this process created (and may clear)


def _prometheus_dir() -> str:
    """PROMETHEUS_MULTIPROC_DIR for SGLang's processes (they inherit the environment; SGLang
    keeps a value already set). A directory of our own unless the operator set one."""
    global _OWN_PROMETHEUS_DIR
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        path = _OWN_PROMETHEUS_DIR = tempfile.mkdtemp(prefix="agent-runtime-sglang-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


def _forget_sglang_collectors() -> None:
    """SGLang's tokenizer side registers its metrics in prometheus_client's default registry
    when an engine is built; a second engine in this process (a restart after the first died)
    would fail with duplicated time series. The previous engine's collectors go first."""
    from prometheus_client import REGISTRY

    names_of = getattr(REGISTRY, "_collector_to_names", {})
    for collector, names in list(names_of.items()):
        if any(str(n).startswith("sglang:") for n in names):
            with contextlib.suppress(KeyError):
                REGISTRY.unregister(collector)


def _clear_prometheus_dir(pids: set[int]) -> None:
    """Remove the metric files of a stopped engine's processes (prometheus_client names them
    `<kind>_<pid>.db`), not those of another engine of this process that still runs."""
    if _OWN_PROMETHEUS_DIR is None:
        return
    for pid in pids:
        for f in glob.glob(os.path.join(_OWN_PROMETHEUS_DIR, f"*_{pid}.db")):
            with contextlib.suppress(OSError):
                os.remove(f)


def _children() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=False)}


def _current_handlers() -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGQUIT)}


def _construct_engine(kwargs: dict[str, Any]) -> Any:
    import sglang

    # SGLang configures logging for its own processes (root level from log_level): keep the
    # host's configuration as it was.
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        return sglang.Engine(**kwargs)
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers


def _shutdown_engine(engine: Any) -> None:
    try:
        engine.shutdown()
    except Exception as exc:  # already dead: its processes are gone either way
        log.warning("engine shutdown: %s", exc)
