"""Smoke test of ``benchmarks/bench_maml.py``: one sinusoid iteration, metagrad only; the
gradient check of the MAML family (``--algorithm metasgd|anil|maml-adam|imaml``) at tiny size.

The project venv has no peers installed, so the harness must skip them with a note. The
harness runs in this process; the timed iteration still runs in its worker subprocess.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

# end-to-end runs: `pytest -m "not slow"` (make test-fast) leaves them out
pytestmark = pytest.mark.slow

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


def test_bench_eval_times_both_layouts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    bench = importlib.import_module("bench_eval")
    text = bench.main(["--preset", "omniglot-5w1s", "--tasks", "1", "--rounds", "1",
                       "--out-dir", str(tmp_path)])  # fmt: skip
    for layout in ("contiguous", "channels_last"):
        assert f"| {layout} |" in text
    assert "Same curve in both layouts (rtol 1e-4): yes." in text
    (result,) = tmp_path.glob("*-omniglot-5w1s-eval.md")
    assert result.read_text().strip() == text.strip() == capsys.readouterr().out.strip()


def test_bench_eval_refuses_a_preset_without_images(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    bench = importlib.import_module("bench_eval")
    with pytest.raises(SystemExit) as e:
        bench.main(["--preset", "sinusoid"])
    assert e.value.code == 2
    assert "sinusoid is not an Omniglot or MiniImagenet preset" in capsys.readouterr().err


FAMILY = ("metasgd", "anil", "maml-adam")


@pytest.mark.parametrize("algorithm", FAMILY)
def test_bench_family_grad_check(algorithm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The new algorithms' gradient check at tiny size (2 tasks, 2 inner steps, both orders):
    metagrad against the autograd reference and whichever peers are installed."""
    monkeypatch.syspath_prepend(str(BENCH))
    bench = importlib.import_module("bench_maml")
    libs = importlib.import_module("maml_libs")
    cfg = dataclasses.replace(bench.CONFIGS["sinusoid"], steps=2)
    here = [k for k in libs.LIBS_BY_ALGORITHM[algorithm] if k != "metagrad-compile"]
    here = [k for k in here if libs.missing(k, algorithm) is None]
    for first_order in (False, True):
        check, strategy = bench.grad_check(cfg, here, first_order, 0, 2, "cpu", algorithm)
        assert check["metagrad"] == "PASS (reference)", check
        assert check["autograd"].startswith("PASS"), check
        if algorithm == "metasgd":  # the learned rates' meta-gradient is compared too
            assert "rates: max err" in check["autograd"]
        assert strategy != "?"
        # the peers, where installed (.bench-venv): what the benchmark found
        for lib, verdict in check.items():
            if algorithm != "maml-adam" or lib in ("metagrad", "autograd"):
                assert verdict.startswith(("PASS", "n/a")), (lib, verdict)
            elif lib == "higher":
                assert "matches the reference with eps-before-bc" in verdict, verdict
            elif lib.startswith("torchopt") and not verdict.startswith("n/a"):
                want = "float32-bc" if first_order else "plain-sqrt"
                assert f"matches the reference with {want}" in verdict, verdict


def test_bench_imaml_grad_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """iMAML's check at tiny size (2 tasks, 2 inner steps): metagrad against the written-out
    CG reference and TorchOpt's implicit differentiation where installed; higher cannot
    express it; no first order."""
    monkeypatch.syspath_prepend(str(BENCH))
    bench = importlib.import_module("bench_maml")
    libs = importlib.import_module("maml_libs")
    cfg = dataclasses.replace(bench.CONFIGS["sinusoid"], steps=2)
    here = [k for k in libs.LIBS_BY_ALGORITHM["imaml"] if libs.missing(k, "imaml") is None]
    check, strategy = bench.grad_check(cfg, here, False, 0, 2, "cpu", "imaml")
    assert check["metagrad"] == "PASS (reference)", check
    assert check["autograd"].startswith("PASS"), check
    assert strategy == "vmap (checked in float64)"  # a small dense net: its tasks batched
    if "torchopt" in check:  # .bench-venv
        assert check["torchopt"].startswith("PASS"), check
    if "higher" in check:
        assert check["higher"].startswith("n/a (higher differentiates through"), check
    # the check tells a different solve apart: the reference with one CG iteration fewer
    base, loss_fn, (batch,) = bench.build(cfg, 0, torch.float64, "cpu", 1, 2)
    _, ref = bench._meta_grads(libs._metagrad("imaml"), base, loss_fn, cfg.lr, 2, False, batch)
    monkeypatch.setattr(libs, "CG_STEPS", libs.CG_STEPS - 1)
    _, fewer = bench._meta_grads(libs._autograd_imaml, base, loss_fn, cfg.lr, 2, False, batch)
    assert not bench.compare(ref, fewer)[0]
    with pytest.raises(SystemExit):
        bench.main(["--config", "sinusoid", "--algorithm", "imaml", "--first-order"])


def test_bench_adam_check_names_a_different_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    """A library whose inner Adam differs from torch.optim's fails the check, and the report
    says how (here: stand-ins built from the known variants, so no peer is needed)."""
    monkeypatch.syspath_prepend(str(BENCH))
    bench = importlib.import_module("bench_maml")
    libs = importlib.import_module("maml_libs")
    table = libs.LIBS_BY_ALGORITHM["maml-adam"]
    variants = libs.VARIANTS["maml-adam"]
    monkeypatch.setitem(table, "eps-late", ("torch", variants["eps-before-bc"], "stand-in"))
    monkeypatch.setitem(table, "naive-sqrt", ("torch", variants["plain-sqrt"], "stand-in"))
    check, _ = bench.grad_check(
        bench.CONFIGS["sinusoid"], ["metagrad", "eps-late", "naive-sqrt"], False, 0, 2,
        algorithm="maml-adam",
    )  # fmt: skip
    assert check["eps-late"].startswith("FAIL (max err")
    assert check["eps-late"].endswith("matches the reference with eps-before-bc)")
    # dead ReLU units give exactly zero inner-gradient entries: sqrt's derivative is inf there
    assert check["naive-sqrt"].startswith("FAIL (NaN/inf in ")
    assert "matches the reference with plain-sqrt" in check["naive-sqrt"]


def test_bench_metasgd_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--algorithm metasgd``: the timed worker updates the learned rates too, and the
    results file names the algorithm."""
    monkeypatch.syspath_prepend(str(BENCH))
    bench = importlib.import_module("bench_maml")
    argv = ["--config", "sinusoid", "--algorithm", "metasgd", "--iters", "1", "--rounds", "1"]
    bench.main([*argv, "--warmup", "0", "--libs", "metagrad,autograd", "--check-tasks", "2",
                "--out-dir", str(tmp_path)])  # fmt: skip
    out = capsys.readouterr().out
    assert "## Meta-SGD meta-iteration: sinusoid (second order)" in out
    (result,) = tmp_path.glob("*-sinusoid-metasgd.json")
    data = json.loads(result.read_text())
    assert data["algorithm"] == "metasgd"
    for lib in ("metagrad", "autograd"):
        assert data["libs"][lib]["check"].startswith("PASS"), data["libs"][lib]
        assert len(data["libs"][lib]["times_ms"]) == 1
