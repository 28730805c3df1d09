"""Stand-in for `sgl_kernel` on hosts where the real CUDA build cannot load.

SGLang imports a few `*_cpu` names from `sgl_kernel` at module load when
SGLANG_USE_CPU_ENGINE=1, but on a CPU without Intel AMX it runs a dense model with plain
PyTorch layers and the torch_native attention backend and never calls them. Any name
resolves to a function that raises NotImplementedError, so a call that does happen is loud
instead of silently wrong. This folder is put first on PYTHONPATH (so SGLang's spawned
scheduler and detokenizer processes see it too) only after the real package failed to import.
"""

__version__ = "0.0.0+agent-runtime-cpu-stand-in"
STAND_IN = True


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def _missing(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} was called, but this host runs the CPU stand-in for sgl_kernel "
            "(the real CUDA build cannot load here)"
        )

    _missing.__name__ = name
    return _missing
