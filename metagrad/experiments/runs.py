"""Run directories: resolved config, metrics CSV, atomic checkpoints, results.

Layout of a run directory::

    config.toml        the resolved config the run was trained with
    metrics.csv        one row per logged iteration
    checkpoint.pt      latest training state (model, optimizer, RNG, iteration)
    best.pt            parameters with the best validation score (when validated)
    eval.json          evaluation results (``metagrad eval``)
    plots/*.png        figures (``metagrad plot``)
    train.lock         held by the training process writing the directory

Checkpoints hold only tensors and plain values (numbers, strings, lists, dicts) and are
read with ``torch.load(weights_only=True)``: loading a run directory someone shared never
runs code from it. Every file is written atomically (a temporary file renamed into place).
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import RunDirError
from .config import Config, dump_toml, load_toml

CONFIG = "config.toml"
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
METRICS = "metrics.csv"
EVAL = "eval.json"
LOCK = "train.lock"


def _cannot_write(path: Path, e: OSError) -> RunDirError:
    why = e.strerror or type(e).__name__
    kept = f"; {path.name} was left as it was" if path.exists() else ""
    return RunDirError(f"cannot write {path}: {why}{kept}")


def atomic_write_bytes(path: Path, write) -> None:
    """Write through a temporary file in the same folder and rename it into place, so a
    crash or a full disk never leaves a half-written file where a good one was.

    Raises :class:`RunDirError` naming the file when the folder cannot be written (no
    permission, disk full, not a folder)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _cannot_write(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _cannot_write(path, e) from None
        raise


class RunLock:
    """The one-writer lock of a run directory: an exclusive ``flock`` on ``train.lock``,
    which holds the owner's process id and host. The kernel drops the lock when its
    process ends, however it ends, so a lock left by a dead process is simply taken."""

    def __init__(self, run: Run) -> None:
        import fcntl

        self.path = run.path / LOCK
        try:
            run.path.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a+")  # noqa: SIM115 (held for the process's life)
        except OSError as e:
            raise _cannot_write(self.path, e) from None
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise RunDirError(
                f"{run.path} is being written by {holder}; wait for that run to end "
                "or choose another --out"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()  # closing drops the flock

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Run:
    """A run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # -------------------------------------------------------------- config
    def has_config(self) -> bool:
        return (self.path / CONFIG).is_file()

    def config(self) -> Config:
        if not self.path.is_dir():
            raise RunDirError(f"run directory {self.path} does not exist")
        if not self.has_config():
            raise RunDirError(f"{self.path} is not a run directory: {CONFIG} is missing")
        try:
            return load_toml(self.path / CONFIG)
        except Exception as e:
            raise RunDirError(f"{self.path / CONFIG} is unreadable: {e}") from None

    def write_config(self, cfg: Config) -> None:
        text = dump_toml(cfg).encode()
        atomic_write_bytes(self.path / CONFIG, lambda f: f.write(text))

    # -------------------------------------------------------------- checkpoints
    def has_checkpoint(self, name: str = CHECKPOINT) -> bool:
        return (self.path / name).is_file()

    def save(self, state: dict[str, Any], name: str = CHECKPOINT) -> None:
        atomic_write_bytes(self.path / name, lambda f: torch.save(state, f))

    def load(self, name: str = CHECKPOINT, map_location: str | torch.device = "cpu") -> dict:
        """A checkpoint's contents; never unpickles anything but tensors and plain values."""
        path = self.path / name
        if not path.is_file():
            raise RunDirError(f"{path} is missing: was the run trained?")
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            raise RunDirError(
                f"{path} holds objects other than tensors and plain values; refusing to "
                "load it, since unpickling them could run code (metagrad never writes such "
                "files)"
            ) from None
        except Exception as e:
            raise RunDirError(
                f"{path} is corrupt ({type(e).__name__}); it cannot be loaded"
            ) from None
        if not isinstance(state, dict):
            raise RunDirError(
                f"{path} is not a metagrad checkpoint (it holds a {type(state).__name__})"
            )
        return state

    def lock(self) -> RunLock:
        """Take the directory's one-writer lock (creating the directory), or raise
        :class:`RunDirError` naming the process that holds it."""
        return RunLock(self)

    # -------------------------------------------------------------- metrics
    def append_metrics(self, row: dict[str, Any]) -> None:
        path = self.path / METRICS
        new = not path.exists()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(row))
                if new:
                    w.writeheader()
                w.writerow(row)
        except OSError as e:
            raise _cannot_write(path, e) from None

    def metrics(self) -> list[dict[str, float]]:
        path = self.path / METRICS
        if not path.exists():
            return []
        with path.open(newline="") as f:
            return [
                {k: float(v) for k, v in r.items() if v not in ("", None)}
                for r in csv.DictReader(f)
            ]

    def truncate_metrics(self, iteration: int) -> None:
        """Drop rows logged after ``iteration`` (after a crash, before resuming)."""
        path = self.path / METRICS
        if not path.exists():
            return
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            return
        keep = [rows[0]] + [r for r in rows[1:] if r and float(r[0]) <= iteration]
        data = "".join(",".join(r) + "\n" for r in keep).encode()
        atomic_write_bytes(path, lambda f: f.write(data))

    # -------------------------------------------------------------- results
    def write_json(self, name: str, obj: Any) -> None:
        data = (json.dumps(obj, indent=2) + "\n").encode()
        atomic_write_bytes(self.path / name, lambda f: f.write(data))

    def read_json(self, name: str) -> Any:
        path = self.path / name
        if not path.is_file():
            raise RunDirError(f"{path} is missing")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RunDirError(f"{path} is corrupt: {e}") from None

    @property
    def plots(self) -> Path:
        p = self.path / "plots"
        p.mkdir(parents=True, exist_ok=True)
        return p


def load_run(path: str | Path, device: str = "cpu", checkpoint: str = "best"):
    """The trained ``MAML`` of a run directory: the best validated parameters when present
    (``checkpoint="best"``), or those training ended with (``"last"``)."""
    from .registry import experiment_for

    run = Run(path)
    cfg = run.config()
    exp = experiment_for(cfg)
    return exp.load_trained(run, torch.device(device), checkpoint)
