"""The results as a markdown report, results.json and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MODE_ORDER = ("server", "engine", "rerender", "openai", "no-radix", "hf", "llamacpp")


def _f(v: Any, digits: int = 2, suffix: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}{suffix}"
    return f"{v:,}{suffix}"


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _x(v: Any) -> str:
    return "–" if v is None else f"{v:.2f}x"


def _modes(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(m, results["modes"][m]) for m in MODE_ORDER if m in results["modes"]]


def markdown(results: dict[str, Any]) -> str:
    w = results["workload"]
    lines = [
        f"Workload: {w['sessions']} sessions x {w['turns']} turns ({w['total_turns']} turns), {w['agents']} agent "
        f"definition(s) x {w['tools']} tools, prefix {', '.join(map(str, w['prefix_tokens_per_agent']))} tokens, "
        f"{w['concurrency']} sessions in flight, tool results ~{w['result_tokens']} tokens, user messages "
        f"~{w['user_tokens']} tokens, max_tokens {w['call_max_tokens']} (tool turns) / {w['text_max_tokens']} "
        f"(text turns), seed {w['seed']}; tool_choice mix {w['tool_choice_mix']}.",
        "",
        "| mode | turns/s | output tok/s | prompt tok computed | prompt tok cached | hit rate | theoretical max | hit / max "
        "| hit / max, turns 2+ | TTFT p50 ms | TTFT p95 ms | e2e p50 ms | e2e p95 ms | peak RSS MB | turns/s vs no-radix "
        "| turns/s vs hf |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in _modes(results):
        r = m.get("ratios", {})
        errors = f" ({m['errors']} failed)" if m.get("errors") else ""
        lines.append(
            f"| {name}{errors} | {_f(m['turns_per_s'], 3)} | {_f(m['output_tokens_per_s'], 1)} | {_f(m['prompt_tokens_computed'])} "
            f"| {_f(m['prompt_tokens_cached'])} | {_pct(m['hit_rate'])} | {_pct(m['theoretical_hit_rate'])} "
            f"| {_pct(m['hit_vs_theoretical'])} | {_pct(m.get('hit_vs_theoretical_after_turn_1'))} "
            f"| {_f(m['ttft_ms_p50'], 0)} | {_f(m['ttft_ms_p95'], 0)} "
            f"| {_f(m['e2e_ms_p50'], 0)} | {_f(m['e2e_ms_p95'], 0)} | {_f(m['peak_rss_mb'], 0)} "
            f"| {_x(r.get('turns_per_s_vs_no-radix'))} | {_x(r.get('turns_per_s_vs_hf'))} |"
        )
    turns = sorted({int(t) for _, m in _modes(results) for t in m["ttft_by_turn"]})
    if turns:
        lines += ["", "TTFT p50 / p95 (ms) by turn index:", "",
                  "| mode | " + " | ".join(f"turn {t}" for t in turns) + " |",
                  "|---|" + "---:|" * len(turns)]
        for name, m in _modes(results):
            bt = {int(k): v for k, v in m["ttft_by_turn"].items()}
            lines.append(f"| {name} | " + " | ".join(
                f"{_f(bt[t]['ttft_ms_p50'], 0)} / {_f(bt[t]['ttft_ms_p95'], 0)}" if t in bt else "–" for t in turns) + " |")
        lines += ["", "Mean prompt tokens by turn index:", "",
                  "| mode | " + " | ".join(f"turn {t}" for t in turns) + " |",
                  "|---|" + "---:|" * len(turns)]
        for name, m in _modes(results):
            bt = {int(k): v for k, v in m["ttft_by_turn"].items()}
            lines.append(f"| {name} | " + " | ".join(_f(bt[t]["prompt_tokens_mean"], 0) if t in bt else "–" for t in turns) + " |")
    if "llamacpp" in results["modes"] and len(results["modes"]) > 1:
        vs = {name: _x(m.get("ratios", {}).get("turns_per_s_vs_llamacpp")) for name, m in _modes(results) if name != "llamacpp"}
        lines += ["", f"turns/s vs llamacpp (llama.cpp's server on the same model and token ids): {vs}."]
    for name, m in _modes(results):
        if m.get("error"):  # a mode that could not run at all (llamacpp: no toolchain, a failed build)
            lines += ["", f"{name} did not run: {m['error']}"]
        elif m.get("note"):  # how it ran differently from its defaults (llamacpp: restarted with other options)
            lines += ["", f"{name}: {m['note']}."]
    out_tokens = {name: m["output_tokens"] for name, m in _modes(results)}
    lines += ["", f"Output tokens written per mode: {out_tokens}."]
    forced = {name: m["forced_tokens"] for name, m in _modes(results) if "forced_tokens" in m}
    if forced:
        lines.append(f"Of those, forced by the call grammar at a turn's start and appended to its prompt without a "
                     f"decode step (jump-forward, decode steps saved): {forced}.")
    mid = {name: (m["forced_tokens_mid_call"], m.get("forced_spans_mid_call", 0)) for name, m in _modes(results)
           if m.get("forced_tokens_mid_call")}
    if mid:
        lines.append("Forced in the middle of the output and appended by the engine's scheduler (one extend pass per "
                     "span instead of a decode step per token), tokens in spans: "
                     + ", ".join(f"{name} {t:,} in {n:,}" for name, (t, n) in mid.items()) + ".")
    warmed = {name: m["warmup_tokens_computed"] for name, m in _modes(results) if "warmup_tokens_computed" in m}
    if warmed:
        prefixes = results.get("workload", {}).get("prefix_tokens_per_agent") or []
        lines.append(f"Prompt tokens computed by prefix warm-ups (`session.open`, a stateless conversation's first "
                     f"request; not in the table), against {sum(prefixes):,} for each agent's prefix once: {warmed}.")
    host_cpu = {name: m["host_cpu_s"] for name, m in _modes(results) if "host_cpu_s" in m}
    if host_cpu:
        lines.append(f"CPU seconds of the benchmark's own process during the mode (client, server, SGLang's "
                     f"tokenizer side; not the scheduler): {host_cpu}.")
    checks = results.get("checks") or {}
    for key, c in checks.items():
        lines.append(f"{key.replace('_', ' ')}: {c['same_prompt_tokens']}/{c['turns']} turns with the same prompt "
                     f"length, {c['same_completion_tokens']}/{c['turns']} with the same output length.")
    if results.get("targets"):
        lines += ["", "| target | value | goal | met |", "|---|---:|---|---|"]
        for t in results["targets"]:
            met = {True: "yes", False: "no", None: "–"}[t["met"]]
            lines.append(f"| {t['target']} | {_f(t['value'], 3)} | {t['goal']} | {met} |")
    ms = results["machine"]
    lines += ["", f"Machine: {ms.get('cpu')} ({ms.get('cpu_count')} cores), {ms.get('memory_gb')} GiB, "
                  f"{ms.get('device', '?')} {ms.get('dtype', '')}; {ms.get('versions')}; {ms.get('date')}."]
    if ms.get("contended"):
        lines.append(f"WARNING: the CPU was shared with other processes during this run (load average before "
                     f"{ms.get('load_average_before')}, after {ms.get('load_average_after')} on {ms.get('cpu_count')} "
                     "cores): the timings are not representative.")
    t = results.get("timings", {})
    lines.append("Timings: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()) + ".")
    return "\n".join(lines) + "\n"


def plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, m in _modes(results):
        bt = sorted(((int(k), v) for k, v in m["ttft_by_turn"].items()), key=lambda kv: kv[0])
        xs = [k for k, v in bt if v["ttft_ms_p50"] is not None]
        ys = [v["ttft_ms_p50"] for k, v in bt if v["ttft_ms_p50"] is not None]
        if xs:
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("turn index")
    ax.set_ylabel("TTFT p50 (ms)")
    ax.set_yscale("log")
    ax.set_title("Time to first token by turn index")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    p = out_dir / "ttft_by_turn.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)

    names = [n for n, _ in _modes(results)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "turns_per_s", "turns/s"), (axes[1], "output_tokens_per_s", "output tokens/s")):
        vals = [results["modes"][n][key] for n in names]
        bars = ax.bar(names, vals, color=[f"C{i}" for i in range(len(names))])
        ax.bar_label(bars, fmt="%.2f")
        ax.set_title(label)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Throughput per mode (same workload)")
    fig.tight_layout()
    p = out_dir / "throughput.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)
    return paths


def write(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text(markdown(results))
    return [out / "results.json", out / "results.md", *plots(results, out)]
