"""Data-parallel meta-training: 2 gloo processes on 127.0.0.1 against one process.

``dist_worker.py`` is the program each rank runs for the library-level tests; the others
go through the real ``metagrad`` command line.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metagrad.errors import ConfigError
from metagrad.experiments import distributed as D
from metagrad.experiments.config import load_toml
from metagrad.experiments.registry import experiment_for
from metagrad.experiments.runs import Run
from metagrad.experiments.training import train

HERE = Path(__file__).resolve().parent
SMALL = ["--set", "eval_tasks=20", "--set", "eval_shots=5,10", "--set", "eval_steps=2"]

pytestmark = [
    pytest.mark.slow,  # several processes: `pytest -m "not slow"` leaves them out
    pytest.mark.skipif(
        not torch.distributed.is_available(), reason="torch.distributed is not available"
    ),
]


def _worker_module():
    spec = importlib.util.spec_from_file_location("dist_worker", HERE / "dist_worker.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def env(**kw: str) -> dict[str, str]:
    out = dict(os.environ) | {"TORCH_CPP_LOG_LEVEL": "FATAL"} | kw
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in kw:
            out.pop(key, None)
    return out


def cli(*args: str, environ: dict | None = None, timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-m", "metagrad", *args], capture_output=True, text=True,
        timeout=timeout, env=environ or env(),
    )  # fmt: skip


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metagrad: error:"), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def assert_params_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def fresh_run(path: Path) -> Run:
    path.mkdir()
    return Run(path)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------- exactness
def test_two_ranks_match_one_process(tmp_path, one_thread):
    cases = ["sinusoid", "conv", "seeds", "timelimit", "metasgd"]
    for case in cases:
        (tmp_path / case).mkdir()
    code = D.launch(
        [sys.executable, str(HERE / "dist_worker.py"), str(tmp_path), *cases], 2,
        env=env(), hint="",
    )  # fmt: skip
    errors = {p.name: p.read_text() for p in tmp_path.glob("*.err")}
    assert code == 0 and not errors, errors
    worker = _worker_module()
    for case in cases:
        ranks = [load(tmp_path / f"{case}-rank{r}.pt") for r in range(2)]
        # every rank ends with exactly the same parameters
        assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0]), case
        if case in ("seeds", "timelimit"):
            continue
        single = fresh_run(tmp_path / f"{case}-single")
        maml = train(worker.experiment(case), single, progress=False)
        assert_params_close(ranks[0], maml.state_dict())
        if case == "metasgd":  # the learned rates trained, identically on both ranks
            lrs = [k for k in ranks[0] if k.startswith("lrs.")]
            assert lrs and any(not torch.all(ranks[0][k] == 0.01) for k in lrs)
        # rank 0 logged the metrics of the whole meta-batch, as one process does
        multi = [r["loss"] for r in Run(tmp_path / case).metrics()]
        torch.testing.assert_close(
            torch.tensor(multi),
            torch.tensor([r["loss"] for r in single.metrics()]),
            rtol=1e-5,
            atol=1e-7,
        )
    stopped = Run(tmp_path / "timelimit").load()
    assert 0 < stopped["iteration"] == stopped["extra"]["final_iteration"] < 10**6
    # rank 1 wrote nothing: the run directory holds what rank 0 wrote
    assert not list(tmp_path.glob("*/*.tmp"))


def test_two_ranks_match_one_process_meta_rl(tmp_path, one_thread):
    pytest.importorskip("gymnasium")
    cases = ["rl-nav", "rl-cheetah"]
    for case in cases:
        (tmp_path / case).mkdir()
    code = D.launch(
        [sys.executable, str(HERE / "dist_worker.py"), str(tmp_path), *cases], 2,
        env=env(), hint="",
    )  # fmt: skip
    errors = {p.name: p.read_text() for p in tmp_path.glob("*.err")}
    assert code == 0 and not errors, errors
    worker = _worker_module()
    for case in cases:
        ranks = [load(tmp_path / f"{case}-rank{r}.pt") for r in range(2)]
        assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0]), case
        single = fresh_run(tmp_path / f"{case}-single")
        maml = train(worker.experiment(case), single, progress=False)
        # the same floats: every per-task quantity is summed in task order (World.sum_rows),
        # and the cheetah's contacts would turn any rounding difference into other paths
        one_process = maml.state_dict()
        assert all(torch.equal(ranks[0][k], one_process[k]) for k in one_process), case
        assert any(not torch.equal(ranks[0][k], v) for k, v in _initial(worker, case).items())
        multi, one = Run(tmp_path / case).metrics(), single.metrics()
        assert len(multi) == len(one) == 2
        for key in ("return_pre", "return_post", "kl"):  # the whole meta-batch's, as one process
            torch.testing.assert_close(
                torch.tensor([r[key] for r in multi]), torch.tensor([r[key] for r in one]),
                rtol=1e-4, atol=1e-6,
            )  # fmt: skip


def _initial(worker, case: str) -> dict:
    torch.manual_seed(worker.experiment(case).cfg["seed"])
    return worker.experiment(case).build().state_dict()


def test_shards_cover_the_batch_once():
    for total, world in [(5, 2), (4, 2), (32, 3), (3, 3)]:
        bounds = [D.shard_bounds(total, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        sizes = [hi - lo for lo, hi in bounds]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


# ---------------------------------------------------------------------------- failures
def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _rank_of(pid: int) -> int | None:
    try:
        items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(i.split(b"=", 1)[1]) for i in items if i.startswith(b"RANK=")]
    return ranks[0] if ranks else None


KILLED = {  # preset, its small settings, the checkpoint interval
    "sinusoid": ("sinusoid", [], 50),
    "meta-rl": ("rl-nav2d", ["rollouts=2", "horizon=10", "cg_iters=2", "val_every=0"], 2),
}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize("case", sorted(KILLED))
def test_killed_rank_stops_the_other_and_keeps_the_checkpoint(tmp_path, case):
    if case == "meta-rl":
        pytest.importorskip("gymnasium")
    name, small, every = KILLED[case]
    out = tmp_path / "run"
    sets = [a for kv in small for a in ("--set", kv)]
    args = ["train", name, "--nproc", "2", "--out", str(out), "--set", "meta_batch=4",
            "--set", "iterations=1000000", "--set", f"checkpoint_every={every}", "--set",
            f"log_every={every}", *sets, "--dist-timeout", "30", "--no-eval", "--quiet"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "metagrad", *args], stderr=subprocess.PIPE, text=True, env=env()
    )
    try:
        deadline = time.time() + 60
        while not (out / "checkpoint.pt").exists() and time.time() < deadline:
            time.sleep(0.05)
        assert (out / "checkpoint.pt").exists(), "no checkpoint within 60 s"
        ranks = {_rank_of(p): p for p in _children(proc.pid)}
        assert set(ranks) == {0, 1}, ranks
        killed_at = time.time()
        os.kill(ranks[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        took = time.time() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
    assert took < 30, f"the launcher took {took:.1f} s (more than --dist-timeout)"
    assert proc.returncode == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert any("rank 1 of 2" in line and "SIGKILL" in line for line in lines), err
    assert all(line.startswith("metagrad: error:") for line in lines[-2:]), err
    assert not any(Path(f"/proc/{p}").exists() for p in ranks.values())  # none left behind
    state = Run(out).load()  # intact: loadable, at a checkpointed iteration
    stopped_at = state["iteration"]
    assert stopped_at > 0 and stopped_at % every == 0
    # it resumes from there (here on one process)
    more = ["--set", "meta_batch=4", *sets, "--set", f"checkpoint_every={every}"]
    more += ["--set", f"log_every={every}", "--set", f"iterations={stopped_at + 2}", "--no-eval"]
    assert cli("train", name, "--out", str(out), *more).returncode == 0
    assert Run(out).load()["iteration"] == stopped_at + 2


def test_hung_rank_times_out(tmp_path):
    (tmp_path / "hang").mkdir()
    started = time.time()
    try:
        code = D.launch(
            [sys.executable, str(HERE / "dist_worker.py"), str(tmp_path), "hang"], 2,
            env=env(METAGRAD_TEST_DIST_TIMEOUT="3"), grace_s=0.5, term_grace_s=0.5,
        )  # fmt: skip
    except D.DistributedError as e:
        # gloo sometimes aborts the waiting process from C++ (SIGABRT) instead of raising
        # in Python; the launcher then names the rank and how it died: no hang either way
        assert "was killed by SIGABRT" in str(e) and time.time() - started < 40, str(e)
        return
    took = time.time() - started
    assert code == 2 and took < 40, (code, took)
    message = (tmp_path / "hang-rank0.err").read_text()
    assert "lost contact" in message and "iteration 3" in message, message


@pytest.mark.parametrize(
    "codes, expected",
    [((143, 143), 143), ((0, 130), 130), ((2, 0), 2), ((0, 1), "rank 1 of 2")],
)  # fmt: skip
def test_launcher_passes_on_requested_stops_and_reports_crashes(codes, expected):
    """128 + SIGTERM/SIGINT is a stop the rank was asked for and checkpointed, 2 an error it
    printed: the launcher exits with it; any other status is a crash it names."""
    script = f"import os, sys; sys.exit({list(codes)}[int(os.environ['RANK'])])"
    run = lambda: D.launch([sys.executable, "-c", script], 2, grace_s=5.0)  # noqa: E731
    if isinstance(expected, int):
        assert run() == expected
    else:
        with pytest.raises(D.DistributedError, match=expected):
            run()


def test_meta_batch_smaller_than_world_is_a_one_line_error(tmp_path):
    proc = cli("train", "sinusoid", "--nproc", "3", "--set", "meta_batch=2",
               "--out", str(tmp_path / "r"))  # fmt: skip
    assert_one_line_error(proc, "meta_batch=2", "3 processes")
    assert not (tmp_path / "r").exists()


def test_unreachable_rendezvous_is_a_one_line_error(tmp_path):
    port = str(D.free_port())
    environ = env(RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    started = time.time()
    proc = cli("train", "sinusoid", "--out", str(tmp_path / "r"), "--dist-timeout", "2",
               environ=environ)  # fmt: skip
    assert time.time() - started < 30
    assert_one_line_error(proc, "rank 1", f"127.0.0.1:{port}", "within 2 s")


def test_nproc_conflicting_with_torchrun_env(tmp_path):
    environ = env(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    proc = cli("train", "sinusoid", "--nproc", "4", "--out", str(tmp_path / "r"), environ=environ)
    assert_one_line_error(proc, "--nproc 4", "WORLD_SIZE=2")


# ---------------------------------------------------------------------------- command line
def test_cli_nproc_end_to_end(tmp_path, one_thread):
    out = tmp_path / "run"
    proc = cli("train", "sinusoid", "--nproc", "2", "--out", str(out), "--set", "iterations=30",
               "--set", "meta_batch=4", "--set", "log_every=10", *SMALL)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "K=10" in proc.stdout and "x 2 processes" in proc.stderr
    for name in ["config.toml", "metrics.csv", "checkpoint.pt", "eval.json"]:
        assert (out / name).is_file(), name
    assert [r["iteration"] for r in Run(out).metrics()] == [10, 20, 30]
    assert {p.name for p in (out / "plots").iterdir()} >= {"figure3_mse_vs_steps.png"}
    # the same as one process with the same config
    single = train(experiment_for(load_toml(out / "config.toml")), fresh_run(tmp_path / "one"),
                   progress=False)  # fmt: skip
    assert_params_close(load(out / "checkpoint.pt")["model"], single.state_dict())
    # one writer: while another process holds the directory, a --nproc run is refused
    with Run(out).lock():
        busy = cli("train", "sinusoid", "--nproc", "2", "--out", str(out), "--set", "iterations=60")
    assert_one_line_error(busy, f"process {os.getpid()}", "another --out")


def test_world_from_env_and_checks():
    assert D.world_from_env({}) is None
    env1 = D.world_from_env({"WORLD_SIZE": "1", "RANK": "0"})
    assert env1 is not None and isinstance(D.init_world(env1, torch.device("cpu")), D.World)
    full = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
            "MASTER_PORT": "29500"}  # fmt: skip
    assert D.world_from_env(full) == D.WorldEnv(3, 4, 1, "h", 29500)
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        D.world_from_env({"WORLD_SIZE": "2", "RANK": "1", "MASTER_PORT": "1"})
    with pytest.raises(ConfigError, match="RANK=2"):
        D.world_from_env(full | {"RANK": "2", "WORLD_SIZE": "2"})

    class Serial:  # an experiment that cannot split its batches
        data_parallel = False
        cfg = {"experiment": "serial", "meta_batch": 8}

    with pytest.raises(ConfigError, match="serial experiments"):
        D.check_parallel(Serial(), 2)
    D.check_parallel(Serial(), 1)
