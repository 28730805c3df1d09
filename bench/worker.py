"""A mode in its own process: `python -m bench.worker JOB.json`.

`no-radix` needs a second engine (radix_cache=False) and `hf` a transformers model. Each runs
in a child process so that (1) its engine never shares a process with the radix engine
(SGLang's Engine.shutdown() kills every child process of its host, which would take a
caller's engine down with it), and (2) its peak memory is its own process tree.

The job file holds the config, the workload, and for hf the reference turns; the worker
writes its records to job["out"] and prints one progress line per finished turn on stdout.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

PROGRESS = "@@bench-turn"


def _config(d: dict[str, Any]) -> Any:
    from runtime.config import Config

    for key in ("backend_urls", "allowed_origins"):
        d[key] = tuple(d.get(key) or ())
    return Config(**d)


def _progress(rec: Any) -> None:
    print(f"{PROGRESS} {rec.session} {rec.turn}", flush=True)


def _dump(records: list[Any], *, ids: bool) -> list[dict[str, Any]]:
    out = []
    for r in records:
        d = r.public()
        if ids:
            d["prompt_ids"], d["output_ids"] = r.prompt_ids, r.output_ids
        out.append(d)
    return out


async def run_no_radix(job: dict[str, Any]) -> dict[str, Any]:
    from bench.modes import EngineDriver, run_sessions, warm_grammars
    from bench.workload import Workload
    from runtime.backends.embedded import EmbeddedBackend
    from runtime.service import AgentRuntime

    cfg = _config(job["cfg"]).replace(radix_cache=False)
    backend = EmbeddedBackend(cfg)
    t0 = time.perf_counter()
    await backend.start()
    start_s = time.perf_counter() - t0
    try:
        tok = backend.tokenizer
        runtime = AgentRuntime(cfg, backend)
        workload = Workload.from_dict(job["workload"], lambda s: len(tok.encode(s, add_special_tokens=False)))
        await warm_grammars(runtime, workload)
        # session.open skips its prefix warm-up here: without a prefix cache it would only
        # compute the prefix twice.
        warmup = workload.warmup()
        await run_sessions(warmup, EngineDriver(runtime, warmup), concurrency=1)
        print(f"{PROGRESS}-start", flush=True)
        records, wall = await run_sessions(workload, EngineDriver(runtime, workload),
                                           concurrency=workload.spec.concurrency, on_turn=_progress)
        return {"records": _dump(records, ids=True), "wall_s": wall, "engine_start_s": start_s}
    finally:
        await backend.stop()


async def run_hf(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from bench.hf import load_model, run_replay

    t0 = time.perf_counter()
    model = load_model(job["model_path"])
    load_s = time.perf_counter() - t0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(job["model_path"])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # One short generate so the first measured turn does not pay one-time initialisation.
    from bench.hf import generate_once

    generate_once(model, job["reference"][0]["prompt_ids"][:32], 2, pad)
    print(f"{PROGRESS}-start", flush=True)
    records, wall = await run_replay(model, job["reference"], concurrency=job["concurrency"], pad_id=pad, on_turn=_progress)
    return {"records": _dump(records, ids=False), "wall_s": wall, "model_load_s": load_s,
            "torch_threads": torch.get_num_threads()}


def main(argv: list[str]) -> int:
    with open(argv[0]) as f:
        job = json.load(f)
    if job["mode"] == "no-radix":
        from runtime.sglang_adapter import prepare

        prepare(job["cfg"]["device"])  # before anything imports sglang
        result = asyncio.run(run_no_radix(job))
    elif job["mode"] == "hf":
        result = asyncio.run(run_hf(job))
    else:
        print(f"unknown worker mode {job['mode']!r}", file=sys.stderr)
        return 2
    tmp = job["out"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, job["out"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
