"""Every script in ``examples/`` (the code the tutorials show) runs with ``--smoke``."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

#: script -> what its --smoke run prints near the end (what shows that it ran through)
EXPECTED = {
    "own_model.py": ["loaded back: the same predictions"],
    "own_tasks.py": ["no meta-training", "maml ", "metasgd ", "anil ", "accuracy after 3 steps"],
    "few_shot_folders.py": ["test accuracy, anil, 5-way 1-shot, 4 tasks"],
    "meta_rl_env.py": ["meta-trained", "not meta-trained", "after one step"],
    "distributed.py": ["difference between ranks", "2 processes against 1"],
}
#: the ones that take more than a couple of seconds (an interpreter, torch, training)
SLOW = {"own_model.py", "own_tasks.py", "few_shot_folders.py", "distributed.py"}
NEEDS = {"meta_rl_env.py": "gymnasium"}  # the rl extra


def run(script: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "METAGRAD_CACHE": str(tmp_path / "cache")}
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip


def test_every_example_is_listed() -> None:
    assert {p.name for p in EXAMPLES.glob("*.py")} == set(EXPECTED)


@pytest.mark.parametrize(
    "script",
    [pytest.param(p.name, marks=[pytest.mark.slow] if p.name in SLOW else [])
     for p in sorted(EXAMPLES.glob("*.py"))],
)  # fmt: skip
def test_example_runs_with_smoke(script: str, tmp_path: Path) -> None:
    assert script in EXPECTED, f"add {script} to EXPECTED (and SLOW if it takes long)"
    if script in NEEDS and importlib.util.find_spec(NEEDS[script]) is None:
        pytest.skip(f"{NEEDS[script]} is not installed")
    proc = run(script, "--smoke", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for text in EXPECTED[script]:
        assert text in proc.stdout, proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["maml", "metasgd", "mamlpp"])
def test_few_shot_folders_every_algorithm(algorithm: str, tmp_path: Path) -> None:
    proc = run("few_shot_folders.py", "--smoke", "--algorithm", algorithm, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"test accuracy, {algorithm}, 5-way 1-shot" in proc.stdout, proc.stdout
