"""Prepare the process environment before anything imports `sglang`.

SGLang decides at import time whether it runs on the CPU (`SGLANG_USE_CPU_ENGINE=1`), and
it imports `sgl_kernel`, whose CUDA build fails to load on a host without `libcuda.so.1`.
Its scheduler and detokenizer are spawned processes, so what they need must be in the
environment (PYTHONPATH), not only in this process's `sys.modules`. Every module of this
project that imports sglang calls `prepare()` first; the first call decides.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
from pathlib import Path

log = logging.getLogger("runtime.sglang_adapter")

SHIM_DIR = Path(__file__).resolve().parent / "cpu_shim"

_lock = threading.Lock()
_prepared: dict[str, object] | None = None


def _real_sgl_kernel_loads() -> bool:
    try:
        importlib.import_module("sgl_kernel")
        return not getattr(sys.modules["sgl_kernel"], "STAND_IN", False)
    except Exception:  # ImportError, OSError (no libcuda.so.1), RuntimeError from CUDA init
        for name in [m for m in sys.modules if m == "sgl_kernel" or m.startswith("sgl_kernel.")]:
            del sys.modules[name]
        return False


def _detect_device() -> str:
    wanted = os.environ.get("INFERENCE_DEVICE", "auto").strip().lower() or "auto"
    if wanted in ("cpu", "cuda"):
        return wanted
    from runtime.config import cuda_available

    return "cuda" if cuda_available() else "cpu"


def prepare(device: str | None = None) -> dict[str, object]:
    """Set SGLang's environment for `device` ('cpu' or 'cuda'; None: from INFERENCE_DEVICE/auto).

    Returns what was decided: {'device', 'sgl_kernel': 'real'|'stand-in'}. Idempotent; a
    second call asking for another device is an error, since sglang is already imported.
    """
    global _prepared
    with _lock:
        if _prepared is not None:
            if device is not None and device != _prepared["device"]:
                raise RuntimeError(f"sglang was already prepared for {_prepared['device']}, not {device}")
            return _prepared
        device = device or _detect_device()
        if "sglang" in sys.modules:
            log.warning("sglang was imported before runtime.sglang_adapter.prepare(); CPU detection may be wrong")
        # Keep SGLang's HTTP-free engine quiet about telemetry and version checks here.
        os.environ.setdefault("SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK", "1" if device == "cpu" else "0")
        if device == "cpu":
            os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
            kernel = "real" if _real_sgl_kernel_loads() else "stand-in"
            if kernel == "stand-in":
                shim = str(SHIM_DIR)
                if shim not in sys.path:
                    sys.path.insert(0, shim)
                parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
                if shim not in parts:
                    os.environ["PYTHONPATH"] = os.pathsep.join([shim, *parts])
                importlib.invalidate_caches()
        else:
            os.environ.pop("SGLANG_USE_CPU_ENGINE", None)
            kernel = "real"
        _prepared = {"device": device, "sgl_kernel": kernel}
        log.debug("sglang environment: %s", _prepared)
        return _prepared
