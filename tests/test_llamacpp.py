"""The `llamacpp` bench mode without llama.cpp: its requests, its parsing of llama-server's
/completion stream, its process handling and its report, against a stand-in `llama-server`
(this file run as a program: a real process on a real socket, speaking llama-server's
/completion shape), and the clear error when the build cannot run. No test builds llama.cpp.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from bench import llamacpp
from bench.metrics import TurnRecord
from bench.runner import BenchError, Progress, parse_modes
from bench.workload import PRESETS

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- the stand-in server

REFUSED = 999_999  # a prompt holding this token id is answered 400, as llama-server refuses a bad request


def _lcp(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def fake_app(args: list[str], log_path: str) -> Any:
    """llama-server's /health and streamed /completion: each slot keeps its last prompt + output,
    a request on a slot computes only what that does not cover (at least one token), and writes
    n_predict tokens (prompt[-1] + 1, + 2, ...). Every request is appended to `log_path`."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    slots: dict[int, list[int]] = {}
    n_slots = int(args[args.index("-np") + 1])

    async def health(_request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def completion(request: Request) -> Any:
        body = await request.json()
        prompt, n, slot = body.get("prompt"), body.get("n_predict"), body.get("id_slot", -1)
        with open(log_path, "a") as f:
            f.write(json.dumps({"body": body}) + "\n")
        if (not isinstance(prompt, list) or not prompt or REFUSED in prompt or not isinstance(n, int)
                or not 0 <= slot < n_slots or body.get("stream") is not True):
            return JSONResponse({"error": {"code": 400, "message": "the prompt is refused", "type": "invalid_request_error"}},
                                status_code=400)
        cached = min(_lcp(prompt, slots.get(slot, [])), len(prompt) - 1) if body.get("cache_prompt") else 0
        out = [prompt[-1] + i + 1 for i in range(n)]
        slots[slot] = prompt + out

        async def events():
            for tok in out:
                yield "data: " + json.dumps({"content": "x", "tokens": [tok], "stop": False, "id_slot": slot}) + "\n\n"
                await asyncio.sleep(0)
            final = {"content": "", "tokens": [], "stop": True, "id_slot": slot, "tokens_predicted": n,
                     "tokens_evaluated": len(prompt), "stop_type": "limit", "tokens_cached": len(prompt) + n - 1,
                     "timings": {"cache_n": cached, "prompt_n": len(prompt) - cached, "predicted_n": n}}
            yield "data: " + json.dumps(final) + "\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/health", health), Route("/completion", completion, methods=["POST"])])


def fake_server_main(args: list[str]) -> int:
    """`llama-server ARGS` as the mode starts it: binds --host on port 0 and says where, like the real one."""
    import uvicorn

    log_path = os.environ["FAKE_LLAMA_LOG"]
    with open(log_path, "a") as f:
        f.write(json.dumps({"argv": args, "ld_library_path": os.environ.get("LD_LIBRARY_PATH", "")}) + "\n")
    if not Path(args[args.index("-m") + 1]).is_file() or args[args.index("--port") + 1] != "0":
        return 2
    crash = os.environ.get("FAKE_LLAMA_CRASH")  # "repack": as the real one on an AMX host; "always"
    if crash == "always" or (crash == "repack" and "--no-repack" not in args):
        os.kill(os.getpid(), signal.SIGSEGV)
    sock = socket.socket()
    sock.bind((args[args.index("--host") + 1], 0))
    host, port = sock.getsockname()
    print(f"main: server is listening on http://{host}:{port} - starting the main loop", flush=True)
    server = uvicorn.Server(uvicorn.Config(fake_app(args, log_path), log_level="warning"))
    server.run(sockets=[sock])
    return 0


def _install(tmp_path: Path) -> Path:
    """A finished 'build' in tmp_path/llama whose bin/llama-server is this file's stand-in."""
    root = tmp_path / "llama"
    bin_dir = root / "venv" / "bin-of-the-package"
    bin_dir.mkdir(parents=True)
    exe = bin_dir / "llama-server"
    exe.write_text(f"#!{sys.executable}\nimport sys\nsys.path[:0] = [{str(ROOT / 'tests')!r}, {str(ROOT)!r}]\n"
                   "from test_llamacpp import fake_server_main\nsys.exit(fake_server_main(sys.argv[1:]))\n")
    exe.chmod(0o755)
    (root / llamacpp.READY).write_text(json.dumps({"version": llamacpp.VERSION, "bin": str(bin_dir)}))
    return root


def _log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- tests


def test_the_request_is_token_ids_in_a_fixed_number_of_greedy_tokens_out_on_one_slot():
    body = llamacpp.completion_body([5, 6, 7], 12, 1)
    assert body == {"prompt": [5, 6, 7], "n_predict": 12, "ignore_eos": True, "temperature": 0.0, "id_slot": 1,
                    "cache_prompt": True, "stream": True}
    cmd = llamacpp.server_command(Path("/b"), Path("/m.gguf"), slots=3, ctx_per_slot=1024, threads=2)
    assert cmd[0] == "/b/llama-server" and cmd[cmd.index("-m") + 1] == "/m.gguf"
    assert (cmd[cmd.index("-np") + 1], cmd[cmd.index("-c") + 1], cmd[cmd.index("-t") + 1]) == ("3", "3072", "2")
    ref = [{"prompt_ids": [1] * 900, "completion_tokens": 40}, {"prompt_ids": [1] * 100, "completion_tokens": 0}]
    assert llamacpp.context_per_slot(ref) == 1024  # 900 + 40 + 64 rounded up to 256


def test_the_stream_is_parsed_into_ids_counts_and_first_token_time():
    c = llamacpp.Completion(started=10.0)
    c.add({"content": "", "tokens": [], "stop": False, "prompt_progress": {"processed": 3}}, 10.5)
    c.add({"content": "a", "tokens": [7], "stop": False}, 11.0)
    c.add({"content": "b", "tokens": [8], "stop": False}, 11.2)
    c.add({"content": "", "tokens": [], "stop": True, "tokens_evaluated": 50, "tokens_predicted": 2, "stop_type": "limit",
           "timings": {"prompt_n": 4, "cache_n": 46}}, 11.3)
    c.check()
    assert (c.first_token, c.output_ids, c.prompt_tokens, c.prompt_computed, c.completion_tokens) == (11.0, [7, 8], 50, 4, 2)
    with pytest.raises(llamacpp.LlamaCppError, match="context is too long"):
        llamacpp.Completion(started=0.0).add({"error": {"code": 400, "message": "the context is too long"}}, 1.0)
    cut = llamacpp.Completion(started=0.0)
    cut.add({"tokens": [1], "stop": False}, 1.0)
    with pytest.raises(llamacpp.LlamaCppError, match="without its final event"):
        cut.check()
    bare = llamacpp.Completion(started=0.0)
    bare.add({"tokens": [], "stop": True}, 1.0)
    with pytest.raises(llamacpp.LlamaCppError, match=r"timings\.prompt_n"):
        bare.check()


def test_the_mode_is_selected_by_name_only_and_needs_a_reference():
    assert "llamacpp" not in parse_modes(None)  # the default run never builds llama.cpp
    assert parse_modes("llamacpp,engine,server") == ["engine", "server", "llamacpp"]
    assert parse_modes("hf,llamacpp,no-radix") == ["no-radix", "hf", "llamacpp"]
    with pytest.raises(BenchError, match="llamacpp replays"):
        parse_modes("server,llamacpp")


def test_a_missing_toolchain_is_a_clear_error_before_anything_is_built(tmp_path, monkeypatch):
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    assert llamacpp.toolchain_problems() == ["a C compiler (cc, gcc or clang; or set CC)",
                                             "a C++ compiler (c++, g++ or clang++; or set CXX)", "make or ninja"]
    said: list[str] = []
    root = tmp_path / "cache" / llamacpp.VERSION
    with pytest.raises(llamacpp.LlamaCppError, match="lacks a C compiler .*a C\\+\\+ compiler .*make or ninja"):
        llamacpp.ensure_built(root, say=said.append)
    assert not root.exists() and said == []  # nothing started


def test_the_install_dir_is_per_user_and_can_be_overridden(tmp_path, monkeypatch):
    monkeypatch.delenv(llamacpp.DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert llamacpp.install_dir() == (tmp_path / "xdg" / "agent-runtime" / "llama.cpp" / llamacpp.VERSION).resolve()
    monkeypatch.setenv(llamacpp.DIR_ENV, str(tmp_path / "env"))
    assert llamacpp.install_dir() == (tmp_path / "env").resolve()
    assert llamacpp.install_dir(tmp_path / "flag") == (tmp_path / "flag").resolve()
    assert llamacpp.built(tmp_path / "flag") is None  # nothing there: it would be built


def _reference(prefix: list[int]) -> list[TurnRecord]:
    """Two sessions x 2 turns as the engine mode records them: turn 2 extends turn 1's prompt and output."""
    recs = []
    for s in range(2):
        t1 = prefix + [100 + s, 101]
        out1 = [300 + s] * 5
        t2 = t1 + out1 + [200 + s] * 7
        recs.append(TurnRecord(session=s, turn=1, agent=0, input_kind="user", tool_choice="required", completion_tokens=5,
                               prompt_ids=t1, output_ids=out1))
        recs.append(TurnRecord(session=s, turn=2, agent=0, input_kind="tool", tool_choice="none", completion_tokens=3,
                               prompt_ids=t2, output_ids=[1, 2, 3]))
    recs.append(TurnRecord(session=1, turn=3, agent=0, input_kind="user", tool_choice="auto", completion_tokens=2,
                           prompt_ids=recs[-1].prompt_ids + [REFUSED]))
    recs.append(TurnRecord(session=0, turn=3, agent=0, input_kind="user", tool_choice="auto", error="failed in the reference"))
    return recs


async def test_the_mode_replays_the_reference_on_its_slots_and_reads_the_cache_from_the_server(tmp_path, monkeypatch):
    """run_mode against the stand-in program: started with the mode's flags and LD_LIBRARY_PATH,
    one warm-up, then every successful reference turn with its ids and output length, each
    session on one slot; cached tokens are what the server says it did not compute; a refused
    request is that turn's error; the process is gone afterwards."""
    root = _install(tmp_path)
    log = tmp_path / "requests.jsonl"
    monkeypatch.setenv("FAKE_LLAMA_LOG", str(log))
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    prefix = list(range(1, 41))
    reference = _reference(prefix)
    counted: list[Any] = []
    progress = Progress(total=0, enabled=False)
    progress.turn = counted.append  # type: ignore[method-assign]
    records, out = await llamacpp.run_mode(reference, model=model, slots=2, progress=progress, root=root)

    assert "error" not in out["extra"] and out["extra"]["slots"] == 2
    assert out["wall_s"] > 0 and out["peak_rss_bytes"] > 0 and out["timings"]["llamacpp_server_start_s"] > 0
    entries = _log(log)
    argv, ld = entries[0]["argv"], entries[0]["ld_library_path"]
    bin_dir = llamacpp.built(root)
    assert ld.split(":")[0] == str(bin_dir)
    assert argv[argv.index("-np") + 1] == "2" and argv[argv.index("-t") + 1] == str(os.cpu_count())
    assert int(argv[argv.index("-c") + 1]) == 2 * llamacpp.context_per_slot(llamacpp.reference_turns(reference))
    bodies = [e["body"] for e in entries[1:]]
    warm, measured = bodies[0], bodies[1:]
    assert warm["n_predict"] == 2 and warm["prompt"][0] != prefix[0]  # the warm-up shares no prefix with a turn
    assert len(measured) == len(records) == 5 and len(counted) == 5  # the reference's failed turn is not replayed

    by = {(r.session, r.turn): r for r in records}
    slot_of = {}
    for body in measured:
        assert body["ignore_eos"] is True and body["cache_prompt"] is True and body["temperature"] == 0.0
        turn = next(r for r in reference if r.prompt_ids == body["prompt"])
        assert body["n_predict"] == turn.completion_tokens
        assert slot_of.setdefault(turn.session, body["id_slot"]) == body["id_slot"]  # pinned for the whole session
    assert sorted(slot_of.values()) == [0, 1]
    for s in range(2):
        t1, t2 = by[(s, 1)], by[(s, 2)]
        assert t1.error is None and t2.error is None
        assert (t1.prompt_tokens, t1.completion_tokens, t1.cached_tokens) == (42, 5, 0)
        assert t1.output_ids == [102, 103, 104, 105, 106] and t1.finish_reason == "length"
        # Turn 2 extends turn 1's ids but not the server's own output: the slot serves turn 1's prompt.
        assert (t2.prompt_tokens, t2.completion_tokens, t2.cached_tokens) == (54, 3, 42)
        assert 0 < t1.ttft_ms <= t1.e2e_ms and t1.t_start < t1.t_end <= t2.t_start
    refused = by[(1, 3)]
    assert refused.error is not None and "HTTP 400: the prompt is refused" in refused.error and refused.finish_reason == "error"
    assert not [p for p in psutil.Process().children(recursive=True) if "llama-server" in " ".join(p.cmdline())]


async def test_a_server_that_cannot_start_fails_the_mode_with_its_output(tmp_path, monkeypatch):
    root = _install(tmp_path)
    monkeypatch.setenv("FAKE_LLAMA_LOG", str(tmp_path / "requests.jsonl"))
    progress = Progress(total=0, enabled=False)
    # The stand-in exits with 2 when the model file is missing, as the real one does.
    records, out = await llamacpp.run_mode(_reference([1, 2, 3]), model=tmp_path / "missing.gguf", slots=2,
                                           progress=progress, root=root)
    assert len(records) == 5 and all(r.error and "exited during startup (exit code 2)" in r.error for r in records)
    assert "exited during startup" in out["extra"]["error"] and out["wall_s"] == 0.0


async def test_a_server_that_crashes_at_startup_is_started_once_more_without_repacking(tmp_path, monkeypatch):
    """llama-server killed by a signal before it is ready (this version does that with its AMX
    weight buffers on an AMX host): started again with --no-repack, and the result says so; a
    second crash fails the mode with the output."""
    root = _install(tmp_path)
    log = tmp_path / "requests.jsonl"
    monkeypatch.setenv("FAKE_LLAMA_LOG", str(log))
    monkeypatch.setenv("FAKE_LLAMA_CRASH", "repack")
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    reference = _reference(list(range(1, 41)))
    records, out = await llamacpp.run_mode(reference, model=model, slots=2, progress=Progress(total=0, enabled=False),
                                           root=root)
    assert all(r.error is None for r in records if (r.session, r.turn) != (1, 3))  # (1, 3): refused by design
    assert out["extra"]["server_args"] == ["--no-repack"] and "crashed at startup" in out["extra"]["note"]
    starts = [e["argv"] for e in _log(log) if "argv" in e]
    assert len(starts) == 2 and "--no-repack" not in starts[0] and starts[1][-1] == "--no-repack"

    monkeypatch.setenv("FAKE_LLAMA_CRASH", "always")
    records, out = await llamacpp.run_mode(reference, model=model, slots=2, progress=Progress(total=0, enabled=False),
                                           root=root)
    assert all(r.error and f"exit code -{int(signal.SIGSEGV)}" in r.error for r in records)
    assert "note" not in out["extra"] and "exited during startup" in out["extra"]["error"]


def _instance(schema: dict[str, Any]) -> Any:
    """The smallest instance of a tools_pool schema (required properties only)."""
    if "enum" in schema:
        return schema["enum"][0]
    if schema.get("type") == "object":
        return {k: _instance(schema["properties"][k]) for k in schema.get("required", [])}
    return {"string": "x", "integer": schema.get("minimum", 0), "number": 0, "boolean": False, "array": []}[schema["type"]]


def _valid_calls(fake: Any) -> Any:
    """Fake replies the engine mode accepts: a valid call of a tool the turn's constraint names, else text."""
    from bench.tools_pool import TOOL_POOL

    tools = {t["function"]["name"]: t["function"]["parameters"] for t in TOOL_POOL}

    def reply(request: Any, prompt: str) -> str:
        c = request.sampling.constraint
        # A named tool's opening is forced (jump-forward): its name ends the prompt, not the constraint.
        where = str(c.value) if c is not None and '"begin": ""' not in str(c.value) else prompt[prompt.rfind("<tool_call>"):]
        names = sorted((n for n in tools if c is not None and f'"{n}' in where), key=len, reverse=True)
        return fake.call_text(names[0], _instance(tools[names[0]])) if names else "Noted."

    return reply


async def test_the_benchmark_reports_the_mode_beside_the_others(cfg, fake, tmp_path, monkeypatch):
    """run_benchmark on the fake backend with engine + llamacpp (the stand-in program): llamacpp
    is in results.json and results.md like every mode; then with no toolchain and no build, the
    mode fails alone and says why while engine is still reported."""
    from bench import report
    from bench.runner import run_benchmark

    root = _install(tmp_path)
    monkeypatch.setenv("FAKE_LLAMA_LOG", str(tmp_path / "requests.jsonl"))
    spec = dataclasses.replace(PRESETS["tiny"], turns=2)
    fake.reply = _valid_calls(fake)
    results = await run_benchmark(spec, ["engine", "llamacpp"], cfg=cfg, backend=fake, show_progress=False, preset="tiny",
                                  llamacpp_dir=str(root))
    e, lc = results["modes"]["engine"], results["modes"]["llamacpp"]
    assert e["turns"] > 0 and lc["turns"] == e["turns"] and lc["errors"] == 0, (e["error_samples"], lc["error_samples"])
    assert lc["reference_mode"] == "engine" and lc["prompt_tokens"] == e["prompt_tokens"]
    assert lc["output_tokens"] == e["output_tokens"] and lc["turns_per_s"] > 0 and lc["ttft_ms_p50"] > 0
    assert lc["prompt_tokens_cached"] == sum(t["cached_tokens"] for t in results["turns"]["llamacpp"])
    assert 0 < lc["prompt_tokens_cached"] <= lc["theoretical_cached_tokens"] + lc["turns"]
    assert e["ratios"]["turns_per_s_vs_llamacpp"] == pytest.approx(e["turns_per_s"] / lc["turns_per_s"])
    report.write(results, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["modes"]["llamacpp"]["turns"] == lc["turns"] and "llama-server" in data["modes"]["llamacpp"]["description"]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| llamacpp |" in md and "turns/s vs llamacpp" in md

    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    results = await run_benchmark(spec, ["engine", "llamacpp"], cfg=cfg, backend=fake, show_progress=False, preset="tiny",
                                  llamacpp_dir=str(tmp_path / "unbuilt"))
    e, lc = results["modes"]["engine"], results["modes"]["llamacpp"]
    assert e["turns"] > 0 and lc["turns"] == 0 and lc["errors"] == e["turns"]
    assert "lacks a C compiler" in lc["error"] and not (tmp_path / "unbuilt").exists()
    report.write(results, tmp_path / "out2")
    md = (tmp_path / "out2" / "results.md").read_text()
    assert f"| llamacpp ({e['turns']} failed) |" in md and "llamacpp did not run: cannot build" in md
