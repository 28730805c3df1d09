"""What makes SGLang run on this project's hosts, in one place (an SGLang upgrade starts here).

    env            prepare(): SGLang's environment before anything imports it (CPU flag, the
                   `sgl_kernel` stand-in on PYTHONPATH for its spawned processes)
    plugin         the `sglang.srt.plugins` entry point: loaded in every SGLang process
    cpu_attention  the prefix-aware SDPA attention backend the plugin installs on CPU engines
    cpu_linear     linear layers and the lm_head on weights packed once for oneDNN (CPU engines)
    cpu_decode     decode steps of Llama-family models without SGLang's per-layer machinery (CPU)
    cpu_shim/      the `sgl_kernel` stand-in, used only where the real one cannot load

Serving code (runtime.backends.embedded) calls prepare() and reads the plugin's report; it
does not patch SGLang itself.
"""

from runtime.sglang_adapter.env import prepare

__all__ = ["prepare"]
