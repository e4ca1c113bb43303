"""Smoke test of ``benchmarks/bench_maml.py``: one sinusoid iteration, metagrad only.

The project venv has no peers installed, so the harness must skip them with a note. The
harness runs in this process; the timed iteration still runs in its worker subprocess.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_bench_sinusoid_metagrad_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    bench = importlib.import_module("bench_maml")
    argv = ["--config", "sinusoid", "--iters", "1", "--rounds", "1", "--warmup", "0"]
    bench.main(
        [*argv, "--libs", "metagrad,higher", "--check-tasks", "2", "--out-dir", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert "| metagrad |" in out
    (result,) = tmp_path.glob("*-sinusoid.json")
    assert result.with_suffix(".md").exists()
    data = json.loads(result.read_text())
    assert data["threads"] == 1  # the default for sinusoid: the preset's single thread
    rows = data["libs"]
    assert rows["metagrad"]["check"].startswith("PASS")
    assert len(rows["metagrad"]["times_ms"]) == 1
    if importlib.util.find_spec("higher") is None:
        assert "higher: skipped (higher not installed)" in out
        assert "higher" not in rows


def test_query_floor_reports_every_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    floor = importlib.import_module("query_floor")
    text = floor.main(["--config", "omniglot-5w1s", "--rounds", "1", "--iters", "1",
                       "--out-dir", str(tmp_path)])  # fmt: skip
    assert "metagrad strategy: vmap support sets" in text
    for part in ("metagrad meta_backward", "query pass", "query pass, channels_last"):
        assert f"| {part} |" in text
    (result,) = tmp_path.glob("*-omniglot-5w1s-floor.md")
    assert result.read_text().strip() == text.strip() == capsys.readouterr().out.strip()
