"""`python -m bench`: the prefix-cache throughput benchmark on multi-turn tool-calling agents.

    python -m bench [--quick] [--modes server,engine,rerender,openai,no-radix,hf]
                    [--sessions S --turns T --agents G --tools K --concurrency C
                     --prefix-tokens N --result-tokens N --user-tokens N --seed N] [--out DIR]

Runs the same seeded workload through every selected mode, shows a progress bar, prints a
markdown table, and with --out writes results.json, results.md and PNG plots there.
`--modes engine,llamacpp` adds llama.cpp's own server on the same model (built once on first
use, see --llamacpp-dir); it runs only when named.
Engine settings (model, device, KV capacity ...) come from INFERENCE_* / .env as for the server.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys

from bench.workload import PRESETS

SIZE_FLAGS = ("sessions", "turns", "agents", "tools", "concurrency", "prefix_tokens", "result_tokens", "user_tokens",
              "call_max_tokens", "text_max_tokens", "seed")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small preset (about 3 minutes on 2 CPU cores)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named preset (default: default; --quick = quick)")
    p.add_argument("--modes", help="comma-separated modes: server, engine, rerender, openai, no-radix, hf (default: all); "
                   "server, engine, rerender and openai run in the order given, no-radix and hf after them")
    d = PRESETS["default"]
    helps = {
        "sessions": "S: sessions", "turns": "T: model turns per session", "agents": "G: agent definitions",
        "tools": "K: tools per agent", "concurrency": "C: sessions in flight at once",
        "prefix_tokens": "rendered system prompt + tools size per agent, in tokens",
        "result_tokens": "tool result size, in tokens", "user_tokens": "user message size, in tokens",
        "call_max_tokens": "max_tokens of turns that may call tools", "text_max_tokens": "max_tokens of text-only turns",
        "seed": "workload seed",
    }
    for name in SIZE_FLAGS:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"{helps[name]} (default preset: {getattr(d, name)})")
    p.add_argument("--out", help="directory for results.json, results.md and plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--llamacpp-dir", help="the llamacpp mode (only when named in --modes, with engine, no-radix or "
                   "rerender, whose token ids it replays): where llama.cpp's server is built on first use "
                   "(default: $BENCH_LLAMACPP_DIR, else ~/.cache/agent-runtime/llama.cpp/VERSION)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from bench.runner import BenchError, parse_modes, run_benchmark

    preset = args.preset or ("quick" if args.quick else "default")
    changes = {k: getattr(args, k) for k in SIZE_FLAGS if getattr(args, k) is not None}
    try:
        spec = dataclasses.replace(PRESETS[preset], **changes)
        modes = parse_modes(args.modes)
    except (ValueError, BenchError) as exc:
        print(f"python -m bench: {exc}", file=sys.stderr)
        return 2

    from runtime.config import ConfigError, load_config
    from runtime.sglang_adapter import prepare

    try:
        cfg = load_config()
    except ConfigError as exc:
        print(f"python -m bench: {exc}", file=sys.stderr)
        return 2
    prepare(cfg.device)  # before anything imports sglang (and before the event loop exists)
    try:
        results = asyncio.run(run_benchmark(spec, modes, cfg=cfg, show_progress=not args.no_progress, preset=preset,
                                            llamacpp_dir=args.llamacpp_dir))
    except BenchError as exc:
        print(f"python -m bench: {exc}", file=sys.stderr)
        return 1
    from bench import report

    print(report.markdown(results))
    if args.out:
        for path in report.write(results, args.out):
            print(f"wrote {path}", file=sys.stderr)
    return 0
