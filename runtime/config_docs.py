"""The configuration's documents, generated from runtime.config.SETTINGS: `.env.example` and the
README's table (`python -m runtime config --env-example | --markdown`; tests keep both equal)."""

from __future__ import annotations

from runtime.config import SETTINGS


def env_example() -> str:
    """The text of `.env.example`, generated from SETTINGS (a test keeps the file equal to it)."""
    lines = [
        "# Configuration of the agent runtime. Copy to .env and uncomment what you change.",
        "# Precedence: CLI flag > environment > .env > default. Unknown INFERENCE_* names are errors.",
        "# Generated from runtime/config.py: python -m runtime config --env-example > .env.example",
    ]
    group = None
    for s in SETTINGS:
        if s.group != group:
            group = s.group
            lines += ["", f"# ---- {group}"]
        allowed = f" [{'|'.join(s.allowed)}]" if s.allowed else ""
        lines.append(f"# {s.help}{allowed}")
        lines.append(f"# {s.env}={s.default}")
    return "\n".join(lines) + "\n"


def markdown_table() -> str:
    rows = ["| variable | default | allowed | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        allowed = ", ".join(s.allowed) if s.allowed else ""
        default = f"`{s.default}`" if s.default else "(empty)"
        rows.append(f"| `{s.env}` | {default} | {allowed} | {s.help} |")
    return "\n".join(rows) + "\n"
