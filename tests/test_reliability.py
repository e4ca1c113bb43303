"""Reliability through the command line: weights-only checkpoints, divergence, one writer
per run directory, unwritable output. Training runs are sinusoid runs of a few iterations,
in this process (``metagrad.cli.main``) except where a second process is the point."""

from __future__ import annotations

import errno
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import metagrad as mg
from metagrad.cli import main
from metagrad.errors import RunDirError
from metagrad.experiments.runs import Run, atomic_write_bytes

TINY = ["--set", "eval_tasks=5", "--set", "eval_steps=1", "--quiet", "--no-eval"]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    # the sinusoid preset sets torch's thread count in this process: restore it
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def train(out: Path, *sets: str) -> int:
    args = ["train", "sinusoid", "--out", str(out), *TINY]
    for s in sets:
        args += ["--set", s]
    return main(args)


def one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("metagrad: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


class _Payload:
    """Unpickling it creates a file: what a malicious shared checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: Path, marker: Path) -> None:
    torch.save({"model": _Payload(marker), "iteration": 1}, path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "good"
    assert train(out, "iterations=4", "log_every=2") == 0
    return out


def _copy(run: Path, to: Path) -> Path:
    to.mkdir()
    for f in run.iterdir():
        if f.is_file():
            (to / f.name).write_bytes(f.read_bytes())
    return to


def test_checkpoints_load_weights_only(trained: Path) -> None:
    for name in ("checkpoint.pt",):
        state = torch.load(trained / name, weights_only=True)
        assert state["iteration"] == 4 and "model" in state


def test_the_payload_is_live_when_unpickled_unsafely(tmp_path: Path) -> None:
    # the planted file really runs code under a plain unpickling: the refusals below matter
    marker = tmp_path / "created"
    _plant(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", ["checkpoint.pt", "best.pt"])
def test_a_code_carrying_checkpoint_is_refused_everywhere(
    trained: Path, tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(trained, tmp_path / "shared")
    marker = tmp_path / "created"
    _plant(run / name, marker)
    commands = [["eval", str(run), "--checkpoint", "best" if name == "best.pt" else "last"]]
    if name == "checkpoint.pt":
        commands += [["plot", str(run)]]
    for argv in commands:
        assert main(argv) == 2
        one_line_error(capsys, name, "refusing to load")
    if name == "checkpoint.pt":
        assert train(run, "iterations=8") == 2  # resuming reads the checkpoint
        one_line_error(capsys, name, "refusing to load")
    with pytest.raises(RunDirError, match="refusing to load"):
        mg.load_run(run, checkpoint="best" if name == "best.pt" else "last")
    assert not marker.exists()


def test_divergence_stops_with_one_line_and_keeps_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    # Adam at 1e30 overflows the parameters within a few steps
    code = train(out, "iterations=40", "meta_lr=1e30", "log_every=1", "checkpoint_every=1")
    assert code == 2
    line = one_line_error(capsys, "diverged at iteration", "meta_lr (now 1e+30)", "inner_lr")
    bad = int(line.split("diverged at iteration ")[1].split(":")[0])
    assert 1 < bad < 40
    state = Run(out).load()
    assert state["iteration"] == bad - 1  # the last good step's checkpoint, untouched
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    rows = Run(out).metrics()
    assert [r["iteration"] for r in rows] == list(range(1, bad))
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_on_nonfinite_skip_skips_and_counts(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert train(out, "iterations=20", "meta_lr=1e30", "log_every=5", "on_nonfinite=skip") == 0
    rows = Run(out).metrics()
    assert rows[-1]["nonfinite_skipped"] > 0
    state = Run(out).load()
    assert state["iteration"] == 20
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_bad_on_nonfinite_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train(tmp_path / "run", "on_nonfinite=ignore") == 2
    one_line_error(capsys, "on_nonfinite", "stop or skip")


def test_unwritable_out_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert train(blocker / "run", "iterations=2") == 2
    one_line_error(capsys, "cannot write", str(blocker / "run"))
    assert main(["train", "sinusoid", "--out", str(blocker), *TINY]) == 2
    one_line_error(capsys, "is a file")


def test_a_failed_write_leaves_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"the good one")

    def disk_full(f) -> None:
        f.write(b"half of the new one")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(RunDirError, match="No space left on device.*left as it was"):
        atomic_write_bytes(path, disk_full)
    assert path.read_bytes() == b"the good one"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left


def test_one_writer_per_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "metagrad", "train", "sinusoid", "--out", str(out), *TINY,
         "--set", "iterations=10000000", "--set", "checkpoint_every=1000000",
         "--set", "log_every=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        lock = out / "train.lock"
        deadline = time.monotonic() + 120
        # wait until it trains (its first metrics row), holding the lock
        while not (out / "metrics.csv").exists():
            assert first.poll() is None, first.stderr.read() if first.stderr else ""
            assert time.monotonic() < deadline, "the first run never started training"
            time.sleep(0.2)
        assert f"process {first.pid}" in lock.read_text()
        start = time.monotonic()
        assert train(out, "iterations=10000000") == 2
        assert time.monotonic() - start < 10
        one_line_error(capsys, str(out), f"process {first.pid}", "another --out")
    finally:
        first.send_signal(signal.SIGTERM)  # it checkpoints and exits
        first.wait(timeout=120)
    assert Run(out).load()["iteration"] > 0
    # its lock file stays behind, naming a process that is gone: the next run takes it over
    assert f"process {first.pid}" in (out / "train.lock").read_text()
    assert train(out, "iterations=1") == 0
    assert f"process {os.getpid()}" in (out / "train.lock").read_text()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_meta_lr_schedules_follow_their_formula(schedule):
    from metagrad.experiments.config import preset
    from metagrad.experiments.registry import experiment_for

    cfg = preset("sinusoid") | {"preset": "sinusoid", "iterations": 10, "lr_schedule": schedule}
    exp = experiment_for(cfg)
    opt = exp.optimizer(exp.build())
    sched = exp.scheduler(opt)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lr0 = cfg["meta_lr"]
    expect = [
        lr0 * (1 - t / 10) if schedule == "linear" else lr0 * (1 + math.cos(math.pi * t / 10)) / 2
        for t in range(10)
    ]
    assert lrs == pytest.approx(expect, rel=1e-12, abs=1e-15)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)


def crash_and_resume(cfg, tmp_path, crash_at=13):
    """Train ``cfg`` straight through into ``tmp_path/a``; and into ``tmp_path/b`` crash at
    iteration ``crash_at`` (a KeyboardInterrupt inside the step) and resume from the last
    checkpoint. Returns both learners."""
    from metagrad.experiments.registry import experiment_for
    from metagrad.experiments.training import train as train_loop

    straight = train_loop(experiment_for(cfg), Run(tmp_path / "a"), progress=False)
    crashing = experiment_for(cfg)
    step, calls = crashing.train_step, []

    def crash(maml, batch):
        calls.append(1)
        if len(calls) == crash_at:
            raise KeyboardInterrupt
        return step(maml, batch)

    crashing.train_step = crash
    with pytest.raises(KeyboardInterrupt):
        train_loop(crashing, Run(tmp_path / "b"), progress=False)
    every = cfg["checkpoint_every"]
    assert Run(tmp_path / "b").load()["iteration"] == (crash_at - 1) // every * every
    resumed = train_loop(experiment_for(cfg), Run(tmp_path / "b"), progress=False)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):  # fmt: skip
        assert torch.equal(a, b), name
    return straight, resumed


def test_a_scheduled_run_resumes_exactly(tmp_path):
    """Crash at iteration 13 of 30 (cosine schedule, SGD), resume from the checkpoint at 10:
    the same parameters and learning rate as a run straight through."""
    from metagrad.experiments.config import preset

    cfg = preset("sinusoid") | {
        "preset": "sinusoid", "iterations": 30, "checkpoint_every": 10, "log_every": 10,
        "lr_schedule": "cosine", "meta_optimizer": "sgd", "meta_lr": 0.01,
    }  # fmt: skip
    crash_and_resume(cfg, tmp_path)
    lr = [Run(tmp_path / d).load()["optimizer"]["param_groups"][0]["lr"] for d in "ab"]
    assert lr[0] == lr[1]


def test_bad_outer_settings(tmp_path, capsys):
    assert train(tmp_path / "a", "meta_optimizer=rmsprop") == 2
    one_line_error(capsys, "meta_optimizer", "adam or sgd")
    assert train(tmp_path / "b", "lr_schedule=step") == 2
    one_line_error(capsys, "lr_schedule", "constant, linear or cosine")
