"""The README's API example runs as written and learns."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

# end-to-end runs: `pytest -m "not slow"` (make test-fast) leaves them out
pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs():
    text = README.read_text()
    block = re.search(
        r"## Quick start: meta-train your own model\n\n```python\n(.*?)```", text, re.S
    ).group(1)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["fast"](scope["x"]).shape == (10, 1)
    assert torch.isfinite(scope["loss"]) and scope["loss"].item() < 3.0


def test_readme_opens_with_the_two_commands():
    first_block = README.read_text().split("```")[1]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()[1:] if line.strip()]
    assert commands == ["make demo", "make test"]
