"""Configuration: every error path is loud and names the variable, value and what is allowed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from runtime.backends.embedded import engine_kwargs
from runtime.config import SETTINGS, Config, ConfigError, load_config, resolve_device
from runtime.config_docs import env_example


def load(env=None, **kw):
    return load_config(env=env or {}, dotenv_path=kw.pop("dotenv_path", None), check_device=kw.pop("check_device", False), **kw)


def test_defaults_are_valid_and_loopback():
    cfg = load()
    assert isinstance(cfg, Config)
    assert cfg.model_id == "" and cfg.host == "127.0.0.1" and cfg.port == 8000
    assert cfg.radix_cache is True and cfg.api_key is None


@pytest.mark.parametrize(
    "name,value,expected",
    [
        ("INFERENCE_PORT", "eighty", "an integer"),
        ("INFERENCE_PORT", "70000", "<= 65535"),
        ("INFERENCE_ATTN_IMPLEMENTATION", "flash3", "auto, sdpa, flash_attention_2, eager"),
        ("INFERENCE_QUANTIZATION", "int3", "none, awq, gptq, bnb-4bit, fp8"),
        ("INFERENCE_BNB_COMPUTE_DTYPE", "int8", "float16, bfloat16"),
        ("INFERENCE_DTYPE", "fp64", "auto, bfloat16, float16, float32"),
        ("INFERENCE_DEVICE", "tpu", "auto, cpu, cuda"),
        ("INFERENCE_CONTEXT_LENGTH", "-5", ">= 128"),
        ("INFERENCE_TRUST_REMOTE_CODE", "maybe", "one of 1, true"),
        ("INFERENCE_MEM_FRACTION_STATIC", "1.5", "in [0.05, 0.95]"),
        ("INFERENCE_KV_CACHE_TOKENS", "10", ">= 1024"),
        ("INFERENCE_BACKEND_URLS", "ftp://x", "http(s)://"),
    ],
)
def test_bad_value_names_variable_value_and_allowed(name, value, expected):
    with pytest.raises(ConfigError) as err:
        load({name: value})
    message = str(err.value)
    assert name in message and repr(value) in message and expected in message


def test_unknown_inference_variable_is_an_error_with_a_suggestion():
    with pytest.raises(ConfigError) as err:
        load({"INFERENCE_MODEL_IDD": "x"})
    assert "INFERENCE_MODEL_IDD" in str(err.value) and "INFERENCE_MODEL_ID" in str(err.value)


def test_other_variables_are_ignored():
    assert load({"PATH": "/bin", "HF_HOME": "/tmp"}).port == 8000


def test_precedence_cli_over_env_over_dotenv(tmp_path: Path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("INFERENCE_PORT=8101\nINFERENCE_LOG_LEVEL=debug\n")
    assert load(dotenv_path=dotenv).port == 8101
    assert load({"INFERENCE_PORT": "8102"}, dotenv_path=dotenv).port == 8102
    cfg = load({"INFERENCE_PORT": "8102"}, dotenv_path=dotenv, overrides={"port": "8103"})
    assert cfg.port == 8103 and cfg.log_level == "debug"


def test_unknown_key_in_dotenv_is_an_error(tmp_path: Path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("INFERENCE_PROT=8101\n")
    with pytest.raises(ConfigError) as err:
        load(dotenv_path=dotenv)
    assert "INFERENCE_PROT" in str(err.value) and str(dotenv) in str(err.value)


def test_config_is_frozen():
    cfg = load()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.port = 1  # type: ignore[misc]


def test_non_loopback_bind_needs_a_key_or_explicit_permission():
    with pytest.raises(ConfigError) as err:
        load({"INFERENCE_HOST": "0.0.0.0"})
    assert "INFERENCE_API_KEY" in str(err.value)
    assert load({"INFERENCE_HOST": "0.0.0.0", "INFERENCE_API_KEY": "k"}).host == "0.0.0.0"
    assert load({"INFERENCE_HOST": "0.0.0.0", "INFERENCE_ALLOW_INSECURE_BIND": "1"}).host == "0.0.0.0"
    assert load({"INFERENCE_HOST": "::1"}).host == "::1"


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"INFERENCE_QUANTIZATION": "awq"}, "cannot run on cpu"),
        ({"INFERENCE_QUANTIZATION": "bnb-4bit"}, "cannot run on cpu"),
        ({"INFERENCE_ATTN_IMPLEMENTATION": "flash_attention_2"}, "needs cuda"),
        ({"INFERENCE_DTYPE": "float16"}, "not supported by SGLang on cpu"),
        ({"INFERENCE_TP_SIZE": "2"}, "need cuda"),
    ],
)
def test_combinations_the_cpu_cannot_run_are_refused_with_the_reason(env, needle):
    with pytest.raises(ConfigError) as err:
        resolve_device(load(env), has_cuda=False)
    assert needle in str(err.value)


def test_cuda_requested_without_cuda_is_refused():
    with pytest.raises(ConfigError) as err:
        resolve_device(load({"INFERENCE_DEVICE": "cuda"}), has_cuda=False)
    assert "no CUDA device" in str(err.value)


def test_device_auto_resolves():
    assert resolve_device(load(), has_cuda=False).device == "cpu"
    assert resolve_device(load(), has_cuda=True).device == "cuda"
    # What the CPU refuses, a CUDA host accepts.
    assert resolve_device(load({"INFERENCE_QUANTIZATION": "awq"}), has_cuda=True).quantization == "awq"


def test_remote_backend_needs_urls():
    with pytest.raises(ConfigError) as err:
        load({"INFERENCE_BACKEND": "sglang"})
    assert "INFERENCE_BACKEND_URLS" in str(err.value)
    with pytest.raises(ConfigError):
        load({"INFERENCE_BACKEND": "openai", "INFERENCE_BACKEND_URLS": "http://a:1,http://b:2"})


def test_default_max_tokens_cannot_exceed_cap():
    with pytest.raises(ConfigError) as err:
        load({"INFERENCE_DEFAULT_MAX_TOKENS": "500", "INFERENCE_MAX_TOKENS_CAP": "100"})
    assert "INFERENCE_DEFAULT_MAX_TOKENS" in str(err.value)


def test_engine_arguments_per_device():
    cpu = engine_kwargs(resolve_device(load(), has_cuda=False), "/m")
    assert cpu["device"] == "cpu" and cpu["attention_backend"] == "torch_native"
    assert cpu["dtype"] == "bfloat16" and cpu["max_total_tokens"] == 65536 and cpu["disable_radix_cache"] is False
    assert cpu["constrained_json_disable_any_whitespace"] is True and cpu["sleep_on_idle"] is True
    cuda = engine_kwargs(resolve_device(load({"INFERENCE_QUANTIZATION": "bnb-4bit", "INFERENCE_BNB_COMPUTE_DTYPE": "float16",
                                              "INFERENCE_ATTN_IMPLEMENTATION": "flash_attention_2"}), has_cuda=True), "/m")
    assert cuda["quantization"] == "bitsandbytes" and cuda["dtype"] == "float16"
    assert cuda["attention_backend"] == "fa3" and cuda["disable_cuda_graph"] is False
    no_radix = engine_kwargs(resolve_device(load({"INFERENCE_RADIX_CACHE": "false"}), has_cuda=False), "/m")
    assert no_radix["disable_radix_cache"] is True
    # jump-forward in the middle of calls (CPU, radix cache on) needs the overlap scheduler off
    assert cpu["disable_overlap_schedule"] is True and "disable_overlap_schedule" not in cuda
    assert "disable_overlap_schedule" not in no_radix
    no_jump = engine_kwargs(resolve_device(load({"INFERENCE_JUMP_FORWARD": "false"}), has_cuda=False), "/m")
    assert "disable_overlap_schedule" not in no_jump


def test_env_example_documents_every_variable_and_matches_the_file():
    text = env_example()
    for s in SETTINGS:
        assert f"# {s.env}=" in text
    committed = (Path(__file__).resolve().parent.parent / ".env.example").read_text()
    assert committed == text, "regenerate: python -m runtime config --env-example > .env.example"


def test_readme_table_lists_every_variable():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [s.env for s in SETTINGS if f"`{s.env}`" not in readme]
    assert not missing, f"README configuration table lacks {missing}"


def test_cli_reports_config_errors_with_exit_code_2(capsys, monkeypatch, tmp_path):
    from runtime.__main__ import main

    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.setenv("INFERENCE_PORT", "nope")
    assert main(["serve"]) == 2
    assert "INFERENCE_PORT" in capsys.readouterr().err
