"""runtime.sglang_adapter.cpu_decode: a CPU engine's decode steps run the lean loop, whose hidden
states are bit-identical to SGLang's forward (checked step by step in an engine that runs both),
and everything the loop does not do stays on SGLang's forward."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import plugin_report_around_request
from runtime.sglang_adapter import prepare

prepare("cpu")

import torch  # noqa: E402

from runtime.sglang_adapter import cpu_decode  # noqa: E402


class _Mode:
    def __init__(self, decode: bool):
        self._decode = decode

    def is_decode(self) -> bool:
        return self._decode


def _model(plan):
    model = torch.nn.Module()
    setattr(model, cpu_decode._PLAN, plan)
    return model


def test_a_model_that_is_not_sglangs_llama_keeps_sglangs_forward():
    class OtherModel(torch.nn.Module):
        pass

    assert cpu_decode.make_plan(OtherModel()) == "model class OtherModel"
    report = cpu_decode.report(SimpleNamespace(model=OtherModel()))
    assert report["runs"] is False and report["reason"] == "model class OtherModel"
    assert cpu_decode.report(SimpleNamespace())["runs"] is False


@pytest.mark.parametrize("case", ["ineligible", "mixed", "input-embeds", "extra-argument"])
def test_steps_the_loop_does_not_run_go_to_sglangs_forward(case, monkeypatch):
    calls = []

    def original(model, *args, **kwargs):
        calls.append((args, kwargs))
        return "sglang"

    plan = "model class X" if case == "ineligible" else cpu_decode._Plan([], None)
    batch = SimpleNamespace(forward_mode=_Mode(case != "mixed"))  # "mixed": neither decode nor a plain extend
    embeds = torch.zeros(1, 4) if case == "input-embeds" else None
    extra = {"get_embedding": True} if case == "extra-argument" else {}
    monkeypatch.setattr(cpu_decode, "decode", lambda *a: pytest.fail("the loop ran"))
    out = cpu_decode.forward(original, _model(plan), torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64),
                             batch, embeds, **extra)
    assert out == "sglang" and len(calls) == 1


_VERIFY = """
import asyncio, json, os
from runtime.sglang_adapter import prepare
prepare("cpu")
from runtime.backends.embedded import EmbeddedBackend, _plugin_report
from runtime.config import load_config

async def main():
    cfg = load_config(env={"INFERENCE_ENGINE_METRICS": "off", "INFERENCE_MAX_SESSIONS": "8"}, dotenv_path=None)
    b = EmbeddedBackend(cfg)
    await b.start()
    try:
        tok, engine = b.tokenizer, b._engine
        prefix = tok.encode("You are a careful assistant. You read every tool result before you answer. " * 12,
                            add_special_tokens=False)
        greedy = {"temperature": 0.0, "ignore_eos": True}
        await engine.async_generate(input_ids=prefix, sampling_params={**greedy, "max_new_tokens": 1})
        # one group sharing the cached prefix, a request alone, a constrained request
        asks = [engine.async_generate(input_ids=prefix + tok.encode(f" Question {i}:", add_special_tokens=False),
                                      sampling_params={**greedy, "max_new_tokens": 12}) for i in range(3)]
        asks.append(engine.async_generate(input_ids=tok.encode("Hello, my name is", add_special_tokens=False),
                                          sampling_params={**greedy, "max_new_tokens": 12}))
        schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        asks.append(engine.async_generate(input_ids=tok.encode("The weather in Paris as JSON:", add_special_tokens=False),
                                          sampling_params={"temperature": 0.0, "max_new_tokens": 16,
                                                           "json_schema": json.dumps(schema)}))
        await asyncio.gather(*asks)
        report = await _plugin_report(engine.tokenizer_manager)
        print(json.dumps({"extra": b.info.extra.get("cpu_decode"), "state": report.get("cpu_decode")}))
    finally:
        await b.stop()

asyncio.run(main())
"""


@pytest.mark.engine
def test_every_pass_of_the_loop_is_bit_identical_to_sglangs_forward():
    # An engine of its own (a fresh process) that runs both paths on every decode step and plain
    # extend pass, returns SGLang's result and counts the passes whose final hidden states differ
    # in any bit.
    env = {**os.environ, cpu_decode.VERIFY_ENV: "1"}
    env = {k: v for k, v in env.items() if not k.startswith("INFERENCE_") or k == "INFERENCE_MODEL_CACHE_DIR"}
    proc = subprocess.run([sys.executable, "-c", _VERIFY], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["extra"] == "lean"
    state = result["state"]
    assert state["runs"] is True
    # the five requests decode together: at least the 11 steps of a 12-token request
    assert state["verified"] == state["steps"] >= 11
    # the prefixes' and the questions' prefills: plain extend passes, verified the same way
    assert state["extends"] >= 3
    assert state["mismatches"] == 0


@pytest.mark.engine
async def test_the_cpu_engine_decodes_with_the_loop(backend):
    # Read back from the scheduler process: the loop runs the default model, and it ran the
    # decode steps of a request this test makes.
    if backend.info.device != "cpu":
        pytest.skip("the decode loop is for CPU engines")
    assert backend.info.extra["cpu_decode"] == "lean"
    before, after = await plugin_report_around_request(backend, "cpu_decode", new_tokens=8)
    assert after["steps"] >= before["steps"] + 7 and after["verified"] == 0
