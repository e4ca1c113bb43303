"""The documentation: the README front page, the docs site (it builds in strict mode and its
API reference covers the public API), the docstring examples (run as doctests), the config
keys' reference."""

from __future__ import annotations

import doctest
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import metagrad
from metagrad.experiments.config import preset, presets
from metagrad.experiments.keys import KEYS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# modules whose docstrings hold examples of the public API
DOCTESTED = [
    "metagrad.core.maml", "metagrad.core.inner", "metagrad.core.adapt",
    "metagrad.algorithms.anil", "metagrad.algorithms.metasgd", "metagrad.algorithms.mamlpp",
    "metagrad.algorithms.reptile", "metagrad.algorithms.imaml",
    "metagrad.models.conv", "metagrad.models.mlp", "metagrad.tasks.sinusoid",
]  # fmt: skip


def test_readme_is_a_short_front_page():
    lines = README.splitlines()
    assert len(lines) <= 200
    for heading in ("## Install", "## Quick start", "## Algorithms", "## Results measured here",
                    "## Performance against the peers"):  # fmt: skip
        assert heading in README


def test_readme_links_resolve():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        assert (ROOT / target).exists(), target


@pytest.mark.parametrize(
    "section",
    [
        "## Results measured here",
        "## The paper's Omniglot table",
        "## Performance against the peers",
    ],
)
def test_every_number_in_the_readme_links_to_its_command(section):
    table = README.split(section)[1].split("\n## ")[0]
    rows = [r for r in table.splitlines() if r.startswith("| ") and "---" not in r][1:]
    assert len(rows) >= 5
    for row in rows:
        assert "](docs/" in row, row


@pytest.mark.parametrize("module", DOCTESTED)
def test_docstring_examples_run(module):
    torch.manual_seed(0)
    result = doctest.testmod(
        importlib.import_module(module), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    assert result.attempted > 0 and result.failed == 0


def test_every_learner_has_an_example():
    for name in ("MAML", "ANIL", "MetaSGD", "MAMLpp", "Reptile", "iMAML"):
        assert ">>>" in getattr(metagrad, name).__doc__, name


def test_api_reference_covers_the_public_api():
    page = (ROOT / "docs" / "reference" / "api.md").read_text()
    documented = set(re.findall(r"^::: metagrad\.(\w+)$", page, re.M))
    public = {n for n in metagrad.__all__ if not n.startswith("__")}
    assert public <= documented, public - documented


def test_getting_started_code_runs():
    page = (ROOT / "docs" / "getting-started.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "getting-started.md", "exec"), {})


def test_every_config_key_has_its_meaning():
    used = {key for name in presets() for key in preset(name)}
    assert used == set(KEYS), (used - set(KEYS), set(KEYS) - used)


@pytest.mark.slow
def test_docs_build_in_strict_mode(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=os.environ | {"NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-3000:]
    reference = (tmp_path / "site" / "reference" / "presets" / "index.html").read_text()
    assert "omniglot-20w1s-mamlpp" in reference and "first_order_epochs" in reference
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    for name in ("MAML", "MAMLpp", "iMAML", "load_run"):
        assert f'id="metagrad.{name}"' in api, name


def test_presets_command_prints_a_presets_keys(capsys):
    from metagrad.cli import main

    assert main(["presets", "omniglot-20w1s-mamlpp"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("omniglot-20w1s-mamlpp: Omniglot 20-way 1-shot MAML++")
    line = next(ln for ln in out.splitlines() if ln.split()[:1] == ["msl_epochs"])
    assert line.split()[2] == "10" and KEYS["msl_epochs"] in line
    assert main(["presets", "no-such-preset"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("metagrad: error: unknown preset 'no-such-preset'")
