"""`./launch.sh cluster N [FLAGS]` (`python -m runtime.cluster N`): N local SGLang workers on the
configured model, sglang-router (cache_aware) in front of them, and this runtime in front of the
router (INFERENCE_BACKEND=sglang), all on loopback.

    python -m runtime.cluster 2                      # workers :30001-30002, router :30000, runtime :8000
    python -m runtime.cluster 2 --port 8001 --worker-base-port 31001 --router-port 31000
    python -m runtime.cluster 4 --no-runtime         # workers + router only

Every FLAG that `python -m runtime serve` takes is accepted: the model and engine settings
(--model-id, --kv-cache-tokens, --device, --tp-size, ...) configure the workers exactly as they
would configure the embedded engine (runtime.backends.embedded.engine_kwargs), and all of them configure
the runtime in front. Each child runs in its own process group; SIGINT/SIGTERM, or any child
exiting, stops all of them (SIGTERM to each group, then SIGKILL after a grace period), and every
child also gets SIGTERM if this process dies (PR_SET_PDEATHSIG), so nothing is left behind.
Logs go to --log-dir (default: a new temporary folder, printed at start); the runtime's own
output stays on this terminal.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.config import SETTINGS, Config, ConfigError, load_config

HOST = "127.0.0.1"
DEFAULT_ROUTER_PORT = 30000
DEFAULT_WORKER_BASE_PORT = 30001
# The default model's chat template has no tools; this parser (<tool_call>{json}</tool_call>)
# gives the workers' own /v1/chat/completions tool calls when tool_choice forces one.
DEFAULT_TOOL_CALL_PARSER = "qwen25"


class ClusterError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def worker_flags(cfg: Config, model_path: str) -> list[str]:
    """`sglang.launch_server` flags for the engine settings of `cfg` (same as the embedded engine)."""
    from runtime.backends.embedded import engine_kwargs

    flags: list[str] = []
    for key, value in engine_kwargs(cfg, model_path).items():
        if key in ("model_path", "log_level") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return flags


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the launcher dies, however it dies. (Linux ties
    this to the thread that spawned the child: start() the cluster from a thread that lives as
    long as the cluster, such as the main thread or a thread-pool worker.)"""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Child:
    name: str
    argv: list[str]
    url: str
    ready_path: str
    log_path: Path | None
    proc: subprocess.Popen | None = None
    ready: bool = False
    started_at: float = 0.0

    def spawn(self, env: dict[str, str]) -> None:
        out: Any = None
        if self.log_path is not None:
            out = open(self.log_path, "ab", buffering=0)
        self.started_at = time.monotonic()
        try:
            self.proc = subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT if out else None,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            if out is not None:
                out.close()

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = 25) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join("    " + line for line in text[-lines:])


@dataclass
class Cluster:
    """N SGLang workers + sglang-router (+ the runtime). `start()` blocks until all are healthy."""

    cfg: Config
    n: int
    with_runtime: bool = True
    worker_ports: list[int] = field(default_factory=list)
    router_port: int = 0
    runtime_port: int = 0
    runtime_args: list[str] = field(default_factory=list)
    worker_args: list[str] = field(default_factory=list)
    router_args: list[str] = field(default_factory=list)
    policy: str = "cache_aware"
    tool_call_parser: str = DEFAULT_TOOL_CALL_PARSER
    log_dir: Path | None = None
    runtime_to_terminal: bool = False
    progress: Callable[[str], None] = field(default=lambda msg: print(f"cluster: {msg}", file=sys.stderr, flush=True))

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ClusterError("a cluster needs at least one worker")
        self.worker_ports = list(self.worker_ports) or [free_port() for _ in range(self.n)]
        if len(self.worker_ports) != self.n:
            raise ClusterError(f"{self.n} workers but {len(self.worker_ports)} ports")
        self._pick_router_port = not self.router_port  # then picked again once the workers are up (start)
        self.router_port = self.router_port or free_port()
        self.runtime_port = self.runtime_port or (self.cfg.port if self.with_runtime else 0)
        self.log_dir = Path(self.log_dir or tempfile.mkdtemp(prefix="agent-runtime-cluster-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []
        self._stopping = threading.Event()
        self.signalled = False

    # ------------------------------------------------------------------ addresses
    @property
    def worker_urls(self) -> list[str]:
        return [f"http://{HOST}:{p}" for p in self.worker_ports]

    @property
    def router_url(self) -> str:
        return f"http://{HOST}:{self.router_port}"

    @property
    def runtime_addr(self) -> str:
        return f"{HOST}:{self.runtime_port}"

    # ------------------------------------------------------------------ plan
    def _plan(self, model_path: str) -> list[Child]:
        py = sys.executable
        assert self.log_dir is not None
        workers = []
        for i, port in enumerate(self.worker_ports):
            argv = [py, "-m", "sglang.launch_server", "--model-path", model_path, "--host", HOST, "--port", str(port),
                    *worker_flags(self.cfg, model_path), "--enable-cache-report", "--log-level", "warning"]
            if self.tool_call_parser:
                argv += ["--tool-call-parser", self.tool_call_parser]
            if self.cfg.device == "cuda":
                argv += ["--base-gpu-id", str(i * self.cfg.tp_size * self.cfg.dp_size)]
            argv += self.worker_args
            workers.append(Child(f"worker {i + 1}/{self.n}", argv, f"http://{HOST}:{port}", "/health",
                                 self.log_dir / f"worker-{i + 1}.log"))
        router_argv = [py, "-m", "sglang_router.launch_router", "--host", HOST, "--port", str(self.router_port),
                       "--worker-urls", *self.worker_urls, "--policy", self.policy,
                       "--prometheus-host", HOST, "--prometheus-port", str(free_port()),
                       "--worker-startup-check-interval", "1", "--log-level", "warn", *self.router_args]
        children = workers + [Child("router", router_argv, self.router_url, "/readiness", self.log_dir / "router.log")]
        if self.with_runtime:
            argv = [py, "-m", "runtime", "serve", *self.runtime_args]
            children.append(Child("runtime", argv, f"http://{self.runtime_addr}", "/ready",
                                  None if self.runtime_to_terminal else self.log_dir / "runtime.log"))
        return children

    def _env(self) -> dict[str, str]:
        from runtime.sglang_adapter import prepare

        prepare(self.cfg.device)  # SGLANG_USE_CPU_ENGINE and the sgl_kernel stand-in, for the children
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.update({
            "INFERENCE_BACKEND": "sglang",
            "INFERENCE_BACKEND_URLS": self.router_url,
            "INFERENCE_PORT": str(self.runtime_port),
        })
        return env

    # ------------------------------------------------------------------ lifecycle
    def start(self, *, timeout_s: float = 900.0) -> Cluster:
        from runtime.model_store import resolve_model

        model_path = str(resolve_model(self.cfg.model_id, cache_dir=self.cfg.cache_dir))
        self.children = self._plan(model_path)
        self.progress(f"model {model_path}; logs in {self.log_dir}")
        workers, env = self.children[: self.n], self._env()
        try:
            for child in workers:  # in parallel: loading is mostly waiting
                child.spawn(env)
            self._wait_ready(workers, timeout_s)
            if self._pick_router_port:  # the workers' SGLang holds ports of its own now: a port picked before
                self.router_port = free_port()  # them could collide (router: "Address already in use")
                self.children = workers + self._plan(model_path)[self.n:]  # (its metrics port picked again too)
            router, rest, env = self.children[self.n], self.children[self.n + 1:], self._env()
            router.spawn(env)
            self._wait_ready([router], 120)
            for child in rest:
                child.spawn(env)
                self._wait_ready([child], 300)
        except BaseException:
            self.stop()
            raise
        summary = f"{self.n} workers ({', '.join(self.worker_urls)}), router {self.router_url} ({self.policy})"
        if self.with_runtime:
            summary += f", runtime ws://{self.runtime_addr}/ws"
        self.progress(f"ready: {summary}")
        return self

    def _wait_ready(self, children: list[Child], timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        last_report = 0.0
        with httpx.Client(timeout=3.0) as client:
            while True:
                if self._stopping.is_set():
                    raise ClusterError("stopped while starting")
                pending = [c for c in children if not c.ready]
                for child in pending:
                    code = child.exited()
                    if code is not None:
                        tail = child.log_tail()
                        raise ClusterError(f"{child.name} exited with code {code} while starting"
                                           + (f"; last lines of {child.log_path}:\n{tail}" if tail else ""))
                    try:
                        child.ready = client.get(child.url + child.ready_path).status_code == 200
                    except httpx.HTTPError:
                        child.ready = False
                    if child.ready:
                        self.progress(f"{child.name} ready at {child.url} ({time.monotonic() - child.started_at:.0f} s)")
                pending = [c for c in children if not c.ready]
                if not pending:
                    return
                now = time.monotonic()
                if now >= deadline:
                    raise ClusterError(f"timed out after {timeout_s:.0f} s waiting for " + ", ".join(c.name for c in pending))
                if now - last_report >= 10:
                    last_report = now
                    self.progress("waiting for " + ", ".join(f"{c.name} ({now - c.started_at:.0f} s)" for c in pending))
                time.sleep(1.0)

    def failed_child(self) -> Child | None:
        return next((c for c in self.children if c.exited() is not None), None)

    def wait(self, *, poll_s: float = 0.5) -> int:
        """Block until stop is requested (0) or a child exits (1, after stopping the rest)."""
        while not self._stopping.is_set():
            dead = self.failed_child()
            if dead is not None:
                self.progress(f"{dead.name} exited with code {dead.exited()}; stopping the cluster")
                tail = dead.log_tail()
                if tail:
                    self.progress(f"last lines of {dead.log_path}:\n{tail}")
                self.stop()
                return 1
            time.sleep(poll_s)
        return 0

    def request_stop(self) -> None:
        """From a signal handler: start() and wait() notice and stop everything."""
        self.signalled = True
        self._stopping.set()

    def stop(self) -> None:
        """SIGTERM the runtime's process group and let it drain; then the router's and the
        workers' groups together; SIGKILL whatever is left after the grace period."""
        self._stopping.set()
        front = [(c.name, c.proc) for c in self.children if c.name == "runtime" and c.proc is not None]
        back = [(c.name, c.proc) for c in self.children if c.name != "runtime" and c.proc is not None]
        for batch, grace in ((front, self.cfg.shutdown_grace_s + 10), (back, 15.0)):
            for _, proc in batch:
                _signal_group(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            for name, proc in batch:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.progress(f"{name} did not stop in time; killing it")
            for _, proc in batch:
                _signal_group(proc.pid, signal.SIGKILL)  # its helpers (scheduler, detokenizer) too
                with_timeout(proc.wait, 10)
        deadline = time.monotonic() + 10
        for name, proc in front + back:
            if not _group_gone(proc.pid, timeout=max(0.0, deadline - time.monotonic())):
                self.progress(f"{name}: processes of group {proc.pid} are still there")

    def alive_groups(self) -> list[int]:
        """Process groups of this cluster that still have a process (zombies count)."""
        return [c.proc.pid for c in self.children if c.proc is not None and not _group_gone(c.proc.pid, timeout=0)]

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_gone(pgid: int, *, timeout: float) -> bool:
    """Wait until no process is left in the group (the leader's children are reaped by init)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def with_timeout(fn: Callable[..., Any], timeout: float) -> None:
    try:
        fn(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="./launch.sh cluster", description=__doc__.split("\n\n")[0],
        epilog="Every flag of `python -m runtime serve` (see ./launch.sh serve --help) is accepted too and configures the "
               "workers' engine and the runtime.", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("n", type=int, metavar="N", help="number of SGLang workers")
    p.add_argument("--worker-base-port", type=int, default=DEFAULT_WORKER_BASE_PORT, help="first worker port (default %(default)s)")
    p.add_argument("--router-port", type=int, default=DEFAULT_ROUTER_PORT, help="router port (default %(default)s)")
    p.add_argument("--policy", default="cache_aware", choices=["cache_aware", "round_robin", "random", "power_of_two"],
                   help="sglang-router policy (default %(default)s)")
    p.add_argument("--tool-call-parser", default=DEFAULT_TOOL_CALL_PARSER,
                   help="workers' --tool-call-parser for their own /v1/chat/completions ('' for none; default %(default)s)")
    p.add_argument("--worker-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for every sglang.launch_server (repeat; e.g. --worker-arg=--enable-metrics)")
    p.add_argument("--router-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for sglang_router.launch_router (repeat; e.g. --router-arg=--balance-abs-threshold=8)")
    p.add_argument("--log-dir", default=None, help="where the workers' and router's logs go (default: a new temporary folder)")
    p.add_argument("--no-runtime", action="store_true", help="start the workers and the router only")
    return p


def main(argv: list[str] | None = None) -> int:
    from runtime.__main__ import _parser as serve_parser
    from runtime.__main__ import setup_logging

    args, rest = _parser().parse_known_args(argv)
    serve_args = serve_parser().parse_args(["serve", *rest])
    overrides = {s.field: getattr(serve_args, s.field, None) for s in SETTINGS}
    for forbidden in ("backend", "backend_urls"):
        if overrides.get(forbidden) is not None:
            print(f"configuration error: --{forbidden.replace('_', '-')} is set by the cluster (the router)", file=sys.stderr)
            return 2
    try:
        # The workers run what the embedded engine would: resolve the device as for it.
        cfg = load_config(overrides={**overrides, "backend": "embedded", "backend_urls": ""})
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level, json_logs=cfg.log_json)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health poll otherwise
    cluster = Cluster(
        cfg, args.n, with_runtime=not args.no_runtime,
        worker_ports=[args.worker_base_port + i for i in range(args.n)], router_port=args.router_port,
        runtime_port=cfg.port, runtime_args=rest, worker_args=args.worker_arg, router_args=args.router_arg,
        policy=args.policy, tool_call_parser=args.tool_call_parser, log_dir=Path(args.log_dir) if args.log_dir else None,
        runtime_to_terminal=True,
    )

    def on_signal(sig: int, _frame: Any) -> None:
        cluster.progress(f"signal {signal.Signals(sig).name}: stopping")
        cluster.request_stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        cluster.start()
    except ClusterError as exc:
        if cluster.signalled:
            cluster.progress("stopped")
            return 0
        print(f"error: {exc}", file=sys.stderr)
        return 1
    code = cluster.wait()
    cluster.stop()
    cluster.progress("stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
