"""`python -m runtime`: serve (default), or inspect the configuration.

    python -m runtime [serve] [--port 8001 --model-id DIR ...]   every INFERENCE_* has a flag
    python -m runtime config [--env-example | --markdown]         print the resolved config or its docs
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
from typing import Any

from runtime.config import SETTINGS, ConfigError, load_config
from runtime.config_docs import env_example, markdown_table


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime", description="Agent-workload LLM runtime (SGLang over JSON-RPC/WebSocket)")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="start the server (default)")
    for s in SETTINGS:
        allowed = f" [{'|'.join(s.allowed)}]" if s.allowed else ""
        serve.add_argument(s.flag, dest=s.field, default=None, metavar=s.field.upper(),
                           help=f"{s.help}{allowed} (env {s.env}, default {s.default!r})")
    cfg = sub.add_parser("config", help="print the resolved configuration, or generate its documentation")
    cfg.add_argument("--env-example", action="store_true", help="print .env.example")
    cfg.add_argument("--markdown", action="store_true", help="print the README's configuration table")
    return parser


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if msg.startswith("{") and record.name == "runtime.requests":
            return msg
        return json.dumps({"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name, "message": msg})


def setup_logging(level: str, *, json_logs: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if json_logs else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # SGLang's own info lines (plugins, server_args) are noise at the server's info level.
    logging.getLogger("sglang").setLevel(max(logging.WARNING, root.level))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "serve"
    if command == "config":
        if args.env_example:
            sys.stdout.write(env_example())
            return 0
        if args.markdown:
            sys.stdout.write(markdown_table())
            return 0
    overrides: dict[str, Any] = {s.field: getattr(args, s.field, None) for s in SETTINGS}
    try:
        cfg = load_config(overrides=overrides)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if command == "config":
        shown = dataclasses.asdict(cfg)
        if shown.get("api_key"):
            shown["api_key"] = "***"
        print(json.dumps(shown, indent=2, default=str))
        return 0
    setup_logging(cfg.log_level, json_logs=cfg.log_json)
    return serve(cfg)


def serve(cfg) -> int:
    # Prepare SGLang's environment before uvicorn creates the event loop: importing sglang
    # switches the asyncio policy to uvloop, which must happen before a loop exists. Every
    # backend but a chat one parses model output here with SGLang's parsers.
    if cfg.backend != "openai":
        from runtime.sglang_adapter import prepare

        prepare(cfg.device if cfg.backend == "embedded" else None)
    if cfg.backend == "embedded":
        import sglang  # noqa: F401

    import uvicorn

    from runtime.app import build_app

    app = build_app(cfg)
    server_state = app.state.server
    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level="warning",
        ws_max_size=cfg.max_frame_bytes,
        ws_ping_interval=20,
        ws_ping_timeout=20,
        lifespan="on",
        timeout_graceful_shutdown=int(cfg.shutdown_grace_s) + 10,
    )

    class _Server(uvicorn.Server):
        """SIGTERM/SIGINT: drain in-flight streams (grace period), then stop uvicorn."""

        loop: asyncio.AbstractEventLoop | None = None
        draining = False

        async def serve(self, sockets=None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            # Not super(): uvicorn re-raises captured signals after serving, and a re-raised
            # SIGTERM would end the process with 143 instead of a clean exit 0.
            loop = self.loop
            if self.draining or loop is None:
                self.should_exit = True
                if self.draining:
                    self.force_exit = True
                return
            self.draining = True
            logging.getLogger("runtime").info("signal %s: draining (grace %.0f s)", sig, cfg.shutdown_grace_s)
            loop.call_soon_threadsafe(lambda: loop.create_task(self._drain_then_exit()))

        async def _drain_then_exit(self) -> None:
            try:
                await server_state.drain(cfg.shutdown_grace_s)
            finally:
                self.should_exit = True

    server = _Server(config)

    def on_fatal(reason: str) -> None:
        server.should_exit = True

    server_state.on_fatal = on_fatal
    server.run()
    if server_state.fatal:
        print(f"error: the engine could not start: {server_state.fatal}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
