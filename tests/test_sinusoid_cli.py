"""Sinusoid end to end, through the library and through the real ``metagrad`` entry point."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import metagrad as mg
from metagrad.errors import ConfigError
from metagrad.experiments.config import preset
from metagrad.experiments.registry import experiment_for
from metagrad.experiments.runs import Run
from metagrad.experiments.training import train
from metagrad.tasks import SinusoidTasks

# end-to-end runs: `pytest -m "not slow"` (make test-fast) leaves them out
pytestmark = pytest.mark.slow

SMALL = ["--set", "eval_tasks=50", "--set", "eval_shots=5,10", "--set", "eval_steps=3"]


def cli(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "metagrad", *args], capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"metagrad {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metagrad: error:"), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def small_cfg(**kw):
    cfg = preset("sinusoid") | {"preset": "sinusoid", "eval_tasks": 100, "eval_steps": 2}
    cfg.update(kw)
    return cfg


def test_short_seeded_run_learns(tmp_path):
    cfg = small_cfg(iterations=1500, log_every=500, seed=3)
    exp = experiment_for(cfg)
    before = exp.evaluate(exp.build())["results"]["K=10"]["mse"]
    maml = train(exp, Run(tmp_path), progress=False)
    after = exp.evaluate(maml)["results"]["K=10"]["mse"]
    # a random init barely adapts in one step; after meta-training one step helps a lot
    assert after[1] < 0.5 * before[1]
    assert after[1] < 0.6 * after[0]


def test_resume_gives_the_same_parameters(tmp_path):
    straight = Run(tmp_path / "straight")
    train(experiment_for(small_cfg(iterations=60, checkpoint_every=25)), straight, progress=False)
    resumed = Run(tmp_path / "resumed")
    train(experiment_for(small_cfg(iterations=35, checkpoint_every=25)), resumed, progress=False)
    train(experiment_for(small_cfg(iterations=60, checkpoint_every=25)), resumed, progress=False)
    a, b = straight.load()["model"], resumed.load()["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    iters = [r["iteration"] for r in resumed.metrics()]
    assert iters == sorted(set(iters))  # no duplicated rows after resume


def test_cli_train_eval_plot(tmp_path):
    out = tmp_path / "run"
    proc = cli(
        "train", "sinusoid", "--out", str(out), "--seed", "1", "--set", "iterations=200", *SMALL
    )
    assert "K=10" in proc.stdout
    for name in ["config.toml", "metrics.csv", "checkpoint.pt", "eval.json"]:
        assert (out / name).is_file(), name
    plots = {p.name for p in (out / "plots").iterdir()}
    assert {"figure2_sinusoid_fits.png", "figure3_mse_vs_steps.png"} <= plots
    result = json.loads(cli("eval", str(out), "--json").stdout)
    assert result["method"] == "maml" and len(result["results"]["K=5"]["mse"]) == 4
    # no validation in sinusoid runs: "best" falls back to the last parameters
    assert result["checkpoint"] == {"file": "checkpoint.pt", "iteration": 200}
    last = json.loads(cli("eval", str(out), "--json", "--checkpoint", "last").stdout)
    assert last["checkpoint"] == {"file": "checkpoint.pt", "iteration": 200}
    assert last["results"] == result["results"]
    assert json.loads((out / "eval-last.json").read_text())["results"] == result["results"]
    assert json.loads((out / "eval.json").read_text())["checkpoint"]["file"] == "checkpoint.pt"
    model = mg.load_run(out)
    assert isinstance(model, mg.MAML)
    x = torch.linspace(-5, 5, 10).view(-1, 1)
    assert model.adapt(x, torch.sin(x), steps=2)(x).shape == (10, 1)


def test_cli_pretrain_baseline_and_comparison(tmp_path):
    pre = tmp_path / "pre"
    cli("train", "sinusoid", "--out", str(pre), "--set", "method=pretrain", "--set",
        "iterations=100", "--set", "finetune_val_tasks=20", *SMALL)  # fmt: skip
    lr = torch.load(pre / "checkpoint.pt", weights_only=True)["extra"]["inner_lr"]
    assert lr in preset("sinusoid")["finetune_lrs"]
    assert json.loads(cli("eval", str(pre), "--json").stdout)["inner_lr"] == lr
    maml = tmp_path / "maml"
    cli("train", "sinusoid", "--out", str(maml), "--set", "iterations=100", "--no-eval", *SMALL)
    table = cli("eval", str(maml), str(pre)).stdout
    assert "maml" in table and "pretrain" in table
    cli("plot", str(maml), "--baseline", str(pre))


def test_cli_oracle_knows_the_task(tmp_path):
    # the oracle sees [x, amplitude, phase]: the same draws as the other methods, task appended
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    sx, sy, qx, qy = experiment_for(small_cfg(method="oracle")).sample(g1)
    batch = SinusoidTasks().sample(25, 10, 10, g2)
    assert sx.shape == (25, 10, 3) and torch.equal(sx[..., :1], batch.support_x)
    assert torch.equal(sx[..., 1], batch.amplitude[:, None].expand(-1, 10))
    assert torch.equal(qx[..., 2], batch.phase[:, None].expand(-1, 10))
    with pytest.raises(ConfigError, match="maml, pretrain, oracle"):
        experiment_for(small_cfg(method="magic"))
    # a tiny pretrained and a tiny MAML run (in process), the oracle through the CLI
    sets = [*SMALL, "--set", "finetune_val_tasks=20"]  # the same evaluation for all three
    small = {"eval_tasks": 50, "eval_shots": [5, 10], "eval_steps": 3, "finetune_val_tasks": 20}
    runs = {}
    for method, iterations in [("maml", 20), ("pretrain", 200)]:
        cfg = small_cfg(method=method, iterations=iterations, log_every=100, **small)
        runs[method] = Run(tmp_path / method)
        runs[method].path.mkdir()
        runs[method].write_config(cfg)
        train(experiment_for(cfg), runs[method], progress=False)
    ora = tmp_path / "oracle"
    proc = cli("train", "sinusoid", "--out", str(ora), "--set", "method=oracle",
               "--set", "iterations=200", *sets)  # fmt: skip
    assert "oracle" in proc.stdout and (ora / "plots" / "figure2_sinusoid_fits.png").is_file()
    lr = torch.load(ora / "checkpoint.pt", weights_only=True)["extra"]["inner_lr"]
    assert lr in preset("sinusoid")["finetune_lrs"]
    table = cli("eval", str(runs["maml"].path), str(runs["pretrain"].path), str(ora)).stdout
    methods = [line.split()[0] for line in table.splitlines() if "K=10" in line]
    assert methods == ["MAML", "pretrain", "oracle"], table
    oracle = json.loads((ora / "eval.json").read_text())
    pre = json.loads((runs["pretrain"].path / "eval.json").read_text())
    assert oracle["method"] == "oracle" and oracle["inner_lr"] == lr
    # same training budget, same test tasks: knowing the task, the oracle fits before adapting
    assert oracle["results"]["K=10"]["mse"][0] < 0.7 * pre["results"]["K=10"]["mse"][0]
    model = mg.load_run(ora)  # expects [x, amplitude, phase] per point
    x = torch.linspace(-5, 5, 10).view(1, -1, 1)
    amp, phase = torch.tensor([2.0]), torch.tensor([0.5])
    xin = SinusoidTasks.task_inputs(x, amp, phase)[0]
    assert model.adapt(xin, SinusoidTasks.function(x, amp, phase)[0], steps=1)(xin).shape == (10, 1)


def test_cli_resume_after_sigterm_matches_straight_run(tmp_path):
    args = ["--set", "iterations=1200", "--set", "checkpoint_every=100", "--no-eval", "--quiet"]
    straight = tmp_path / "straight"
    cli("train", "sinusoid", "--out", str(straight), *args)
    out = tmp_path / "stopped"
    proc = subprocess.Popen(
        [sys.executable, "-m", "metagrad", "train", "sinusoid", "--out", str(out), *args],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    stopped_at = torch.load(out / "checkpoint.pt", weights_only=True)["iteration"]
    if proc.returncode == 0:  # it finished before the signal arrived: nothing to resume
        pytest.skip("training finished before SIGTERM arrived")
    # a requested stop, not an error: the shell's status for SIGTERM, one line without "error"
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "metagrad: stopped by SIGTERM at iteration" in err and "checkpoint saved" in err
    assert "error" not in err
    assert 0 < stopped_at < 1200
    cli("train", "sinusoid", "--out", str(out), *args)
    a = torch.load(straight / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- bad input
def test_bad_set_key_and_value(tmp_path):
    assert_one_line_error(
        cli("train", "sinusoid", "--set", "iteration=5", check=False), "iteration"
    )
    assert_one_line_error(
        cli("train", "sinusoid", "--set", "iterations=many", check=False), "iterations", "int"
    )
    assert_one_line_error(cli("train", "sinusoid", "--set", "method=magic", check=False), "method")
    assert_one_line_error(cli("train", "sinusoid", "--set", "vectorize=maybe", check=False))
    assert_one_line_error(cli("train", "sinusoid", "--set", "noequals", check=False), "key=value")


def test_unknown_preset_and_bad_device():
    assert_one_line_error(cli("train", "sinus", check=False), "unknown preset", "sinusoid")
    assert_one_line_error(cli("presets", "--device", "tpu:0", check=False), "--device")


def test_bad_config_file(tmp_path):
    missing = tmp_path / "nope.toml"
    assert_one_line_error(
        cli("train", "sinusoid", "--config", str(missing), check=False), "nope.toml"
    )
    bad = tmp_path / "bad.toml"
    bad.write_text("iterations = [\n")
    assert_one_line_error(cli("train", "sinusoid", "--config", str(bad), check=False), "TOML")
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('inner_lr = "fast"\n')
    assert_one_line_error(cli("train", "sinusoid", "--config", str(wrong), check=False), "inner_lr")


def test_missing_and_corrupt_run_dirs(tmp_path):
    assert_one_line_error(cli("eval", str(tmp_path / "none"), check=False), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(cli("eval", str(tmp_path / "empty"), check=False), "config.toml")
    out = tmp_path / "run"
    cli("train", "sinusoid", "--out", str(out), "--set", "iterations=20", "--no-eval")
    ckpt = out / "checkpoint.pt"
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[: len(good) // 2])
    assert_one_line_error(cli("eval", str(out), check=False), "checkpoint.pt", "corrupt")
    ckpt.write_bytes(good)
    (out / "config.toml").write_text("experiment = \n")
    assert_one_line_error(cli("eval", str(out), check=False), "config.toml")


def test_conflicting_resume_keeps_checkpoint(tmp_path):
    out = tmp_path / "run"
    cli("train", "sinusoid", "--out", str(out), "--set", "iterations=20", "--no-eval")
    before = (out / "checkpoint.pt").read_bytes()
    proc = cli("train", "sinusoid", "--out", str(out), "--set", "inner_lr=0.5", check=False)
    assert_one_line_error(proc, "inner_lr", "new --out")
    assert (out / "checkpoint.pt").read_bytes() == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert_one_line_error(cli("train", "sinusoid", "--out", str(other), check=False), "not a run")
    assert (other / "notes.txt").read_text() == "mine"


def test_console_script_is_installed():
    script = Path(sys.executable).parent / ("metagrad.exe" if os.name == "nt" else "metagrad")
    if not script.exists():
        pytest.skip("package not installed as a console script in this environment")
    proc = subprocess.run([str(script), "presets"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "sinusoid" in proc.stdout
