"""The model store: the default model is materialized once, atomically, safely under concurrency."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runtime import model_store
from runtime.model_store import MANIFEST, ModelStoreError, ensure_default_model, resolve_model

ROOT = Path(__file__).resolve().parent.parent


def fake_convert(gguf: Path, out: Path) -> None:
    (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (out / "model.safetensors").write_bytes(os.urandom(4096))


@pytest.mark.engine  # materializes the default model (about 20 s the first time) and hashes it
def test_real_default_model_is_complete_and_verified(cfg):
    path = ensure_default_model(cfg.cache_dir)
    manifest = json.loads((path / MANIFEST).read_text())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    assert model_store._manifest_ok(path, gguf=model_store.default_gguf_path(), deep=True)
    assert json.loads((path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_idempotent_second_call_does_not_rebuild(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(model_store, "_convert_gguf", lambda g, o: (calls.append(1), fake_convert(g, o)))
    first = ensure_default_model(tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    second = ensure_default_model(tmp_path)
    assert first == second and calls == [1]
    assert (second / "model.safetensors").stat().st_mtime_ns == stamp


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(gguf, out):
        (out / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(model_store, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_default_model(tmp_path)
    leftovers = [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_incomplete_or_corrupt_target_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setattr(model_store, "_convert_gguf", fake_convert)
    target = ensure_default_model(tmp_path)
    (target / "model.safetensors").write_bytes(b"truncated")  # size no longer matches the manifest
    rebuilt = ensure_default_model(tmp_path)
    assert rebuilt == target and (rebuilt / "model.safetensors").stat().st_size == 4096
    (target / MANIFEST).unlink()  # a crash before the manifest: not trusted
    again = ensure_default_model(tmp_path)
    assert (again / MANIFEST).is_file()


def test_concurrent_starters_build_once(tmp_path):
    """Two processes at once: one builds, the other waits and uses the same complete model."""
    log = tmp_path / "builds.log"
    script = textwrap.dedent(f"""
        import sys, time, json, os
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from runtime import model_store
        def slow(gguf, out):
            with open({str(log)!r}, "a") as f:
                f.write(f"{{os.getpid()}}\\n")
            time.sleep(1.5)
            (out / "config.json").write_text("{{}}")
            (out / "model.safetensors").write_bytes(b"x" * 1000)
        model_store._convert_gguf = slow
        print(model_store.ensure_default_model(Path({str(tmp_path / 'cache')!r})))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1] and Path(outs[0]).is_dir()
    assert len(log.read_text().split()) == 1, "the model was built more than once"


def test_local_directory_passes_through(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path), cache_dir=tmp_path / "c") == tmp_path.resolve()


def test_local_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelStoreError, match="no config.json"):
        resolve_model(str(tmp_path), cache_dir=tmp_path / "c")


def test_missing_local_path_is_refused(tmp_path):
    with pytest.raises(ModelStoreError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"), cache_dir=tmp_path / "c")


def test_unreachable_hub_id_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no internet here; offline makes it fail fast anywhere
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelStoreError) as err:
        resolve_model("some-org/not-a-real-model-xyz", cache_dir=tmp_path / "c")
    assert "some-org/not-a-real-model-xyz" in str(err.value)
