"""MkDocs hook: the reference pages' tables are generated from the code (the presets table,
the config keys' meanings, the CLI's argparse help), so they cannot drift from it."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def _presets() -> str:
    from metagrad.experiments.config import presets

    rows = [f"| `{name}` | {desc} |" for name, desc in presets().items()]
    return "\n".join(["| preset | what |", "|---|---|", *rows])


def _values(key: str, table: dict) -> str:
    from metagrad.experiments.keys import format_value

    having = {name: format_value(cfg[key]) for name, cfg in sorted(table.items()) if key in cfg}
    counts = Counter(having.values())
    common = counts.most_common(1)[0][0]
    if len(counts) == 1:
        return f"`{common}`"
    parts = [f"`{common}` (the other presets)"]
    for value in counts:
        if value != common:
            names = ", ".join(n for n, v in having.items() if v == value)
            parts.append(f"`{value}`: {names}")
    return "<br>".join(parts)


def _keys() -> str:
    from metagrad.experiments.keys import KEYS
    from metagrad.experiments.registry import PRESETS

    table = {name: cfg for name, (_, cfg) in PRESETS.items()}
    rows = [f"| `{k}` | {KEYS[k]} | {_values(k, table)} |" for k in KEYS]
    return "\n".join(["| key | meaning | value in the presets |", "|---|---|---|", *rows])


def _cli() -> str:
    import os

    from metagrad.cli import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps help to the terminal's width
    parser = build_parser()
    blocks = [f"```text\n$ metagrad --help\n{parser.format_help()}```"]
    for action in parser._actions:  # argparse keeps its subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                blocks.append(f"```text\n$ metagrad {name} --help\n{sub.format_help()}```")
    return "\n\n".join(blocks)


def _readme() -> str:
    # the front page is the README, its links made relative to docs/
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return text.replace("](docs/", "](")


def on_page_markdown(markdown: str, **kwargs) -> str:
    renders = (("presets", _presets), ("keys", _keys), ("cli", _cli), ("readme", _readme))
    for name, render in renders:
        marker = f"<!-- generated: {name} -->"
        if marker in markdown:
            markdown = markdown.replace(marker, render())
    return markdown
