"""Data-parallel meta-training over ``torch.distributed``.

Every process (rank) trains the same model on its own shard of each meta-batch, and the
ranks average their gradients with one all-reduce before the (single, identical) meta-
optimizer step, so the parameters stay the same on every rank.

How a meta-batch is split: every rank draws the *whole* meta-batch from the same seeded
generator (the one a single process would use) and keeps the slice
``[B*r//W : B*(r+1)//W]`` of its ``B`` tasks. The union of the shards is then exactly the
single-process meta-batch, the generator state in a checkpoint is the same on every rank,
and a run may be resumed with a different number of processes. Drawing ``B`` tasks is
cheap next to the meta-gradient of ``B/W`` tasks. The meta-loss is a mean over tasks, so
each rank weights the gradient of its shard mean by ``shard_size / B`` and the all-reduce
sums them: the result is the single-process meta-gradient, up to float rounding, also when
``W`` does not divide ``B`` (the shards then differ by one task). Training metrics (loss,
accuracy) are averaged the same way, in the same buffer. Meta-RL sums per-task rows
gathered from every rank in task order instead (:meth:`World.sum_rows`): the same floats
as one process, which chaotic simulators need.

Only rank 0 writes the run directory (config, metrics, checkpoints), validates, evaluates
and shows the progress bar; the others wait for it at their next collective operation.
A rank that dies makes the others fail at their next all-reduce ("connection closed by
peer") or, if it hangs, after ``timeout_s``; nothing is checkpointed after the failure, so
the last checkpoint stays as it was.

:func:`launch` starts ``N`` local processes (``metagrad train --nproc N``);
``torchrun ... -m metagrad train PRESET`` works too (see :func:`world_from_env`).
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import torch
from torch import Tensor, nn

from ..errors import ConfigError, MetagradError

T = TypeVar("T")

#: default seconds to wait for the other processes (rendezvous and every collective)
DEFAULT_TIMEOUT_S = 600.0


class DistributedError(MetagradError):
    """The processes of a multi-process run could not meet or lost each other."""


class PeerFailed(MetagradError):
    """Rank 0 failed with an error it reports itself; the other ranks exit quietly."""


# ------------------------------------------------------------------------ environment
@dataclass(frozen=True)
class WorldEnv:
    """The process layout ``torchrun`` (or :func:`launch`) puts in the environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def world_from_env(environ: Mapping[str, str] | None = None) -> WorldEnv | None:
    """The layout from ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT``; None when ``WORLD_SIZE`` is not set (a plain single process)."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return None

    def number(key: str, default: str | None = None) -> int:
        text = env.get(key, default)
        if text is None:
            raise ConfigError(
                f"WORLD_SIZE is set but {key} is not; start the processes with torchrun or "
                "`metagrad train --nproc N`"
            )
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"bad value {text!r} for environment variable {key}") from None

    world, rank = number("WORLD_SIZE"), number("RANK")
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} and WORLD_SIZE={world} do not fit together")
    local = number("LOCAL_RANK", str(rank))
    if world == 1:
        return WorldEnv(rank, world, local, env.get("MASTER_ADDR", ""), 0)
    addr = env.get("MASTER_ADDR")
    if not addr:
        raise ConfigError(
            "WORLD_SIZE is set but MASTER_ADDR is not; start the processes with torchrun or "
            "`metagrad train --nproc N`"
        )
    return WorldEnv(rank, world, local, addr, number("MASTER_PORT"))


def current_rank() -> int:
    """This process's rank from the environment (0 when it is not part of a group)."""
    try:
        return int(os.environ.get("RANK", "0")) if "WORLD_SIZE" in os.environ else 0
    except ValueError:
        return 0


def shard_bounds(total: int, rank: int, world: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``'s tasks among ``total`` (sizes differ by at most one)."""
    return total * rank // world, total * (rank + 1) // world


def check_parallel(exp: Any, world: int) -> None:
    """A :class:`ConfigError` when ``exp`` cannot train on ``world`` processes: its
    meta-batch cannot give every rank a task, or its class sets ``data_parallel = False``
    (batches that are not tuples of task tensors)."""
    if world > 1 and not exp.data_parallel:
        raise ConfigError(
            f"{exp.cfg.get('experiment', 'this')} experiments cannot be trained with several "
            "processes; drop --nproc"
        )
    check_shards(exp.cfg, world)


def check_shards(cfg: Mapping[str, Any], world: int) -> None:
    """A :class:`ConfigError` when the meta-batch cannot give every rank a task."""
    batch = cfg.get("meta_batch")
    if world > 1 and isinstance(batch, int) and batch < world:
        raise ConfigError(
            f"meta_batch={batch} cannot be split over {world} processes: every process needs "
            f"at least one task; use fewer processes or --set meta_batch={world} or more"
        )


def _short(e: BaseException) -> str:
    """The first sentence of a c10d/gloo message, without its source location."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", text)
    text = re.sub(r"\s*This is typically caused by.*$", "", text)
    return text.rstrip(". ")


# ------------------------------------------------------------------------ worlds
class World:
    """A single process: rank 0 of 1. Every collective operation is a no-op.

    :class:`DistributedWorld` is the multi-process version; the training loop is written
    against this interface so that one code path serves both.
    """

    rank = 0
    size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: Any) -> tuple[Any, float]:
        """This rank's part of a meta-batch and its weight (its share of the tasks).

        A batch with a ``shard(world)`` method shards itself (meta-RL: the batch is a seed
        and the rank samples its own tasks' paths)."""
        if hasattr(batch, "shard"):
            return batch.shard(self)
        return batch, 1.0

    def all_reduce(self, tensor: Tensor, where: str = "") -> Tensor:
        """The sum of ``tensor`` over ranks (a new tensor; here, a copy)."""
        return tensor.clone()

    def sum_rows(self, rows: Tensor, where: str = "") -> Tensor:
        """The sum over the first dimension of every rank's ``rows`` together, in rank
        order: ``rows.sum(0)`` of their concatenation, so the same floats as one process
        holding all the rows (an all-reduce would add the ranks' partial sums instead)."""
        return rows.sum(0)

    def reduce_step(
        self,
        module: nn.Module,
        metrics: dict[str, float | Tensor],
        weight: float,
        flags: Sequence[bool],
        where: str = "",
    ) -> tuple[dict[str, float], list[bool]]:
        """Sum ``weight``-scaled gradients and metrics over ranks; OR the ``flags``."""
        return metrics, list(flags)

    def broadcast_module(self, module: nn.Module, where: str = "") -> None:
        """Copy rank 0's parameters and buffers to every rank."""

    def broadcast_object(self, obj: T, where: str = "") -> T:
        """Rank 0's ``obj`` on every rank (a picklable object)."""
        return obj

    def on_main(self, fn: Callable[[], T], where: str = "") -> T:
        """Run ``fn`` on rank 0 only and hand its result to every rank.

        A :class:`MetagradError` it raises is raised again on rank 0 and becomes a quiet
        :class:`PeerFailed` on the others (rank 0 reports it).
        """
        return fn()

    def barrier(self, where: str = "") -> None:
        """Wait until every rank has arrived."""

    def close(self) -> None:
        """Leave the process group."""


class DistributedWorld(World):
    """One rank of a ``torch.distributed`` process group (gloo on CPU, NCCL on GPUs)."""

    def __init__(self, env: WorldEnv, device: torch.device, timeout_s: float) -> None:
        import torch.distributed as dist

        if not dist.is_available():
            raise DistributedError("this build of torch has no torch.distributed")
        self.env = env
        self.rank = env.rank
        self.size = env.world_size
        self.device = device
        self.timeout_s = float(timeout_s)
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        self._dist = dist
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if env.rank != 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            _wait_for_store(env, self.timeout_s)  # a clear error when it cannot be reached
        try:
            dist.init_process_group(
                self.backend,
                init_method=f"tcp://{_host(env.master_addr)}:{env.master_port}",
                rank=env.rank,
                world_size=env.world_size,
                timeout=datetime.timedelta(seconds=self.timeout_s),
            )
        except Exception as e:  # noqa: BLE001  (c10d raises several RuntimeError kinds)
            raise DistributedError(
                f"rendezvous of {env.world_size} processes at {env.master_addr}:"
                f"{env.master_port} failed within {self.timeout_s:g} s ({_short(e)}); check that "
                "every rank is started, that MASTER_ADDR/MASTER_PORT point to rank 0's "
                "machine and that the port is reachable (--dist-timeout sets the wait)"
            ) from None
        global _joined_group
        _joined_group = True

    # -------------------------------------------------------------- helpers
    def _guard(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            raise DistributedError(
                f"lost contact with the other processes during {what} ({_short(e)}); a process "
                "died or hung longer than the timeout; nothing was checkpointed after the "
                "failure: run the same command again to resume from the last checkpoint"
            ) from None

    def _barrier(self) -> None:
        if self.backend == "nccl":
            self._dist.barrier(device_ids=[self.device.index or 0])
        else:
            self._dist.barrier()

    # -------------------------------------------------------------- World interface
    def shard(self, batch: Any) -> tuple[Any, float]:
        if hasattr(batch, "shard"):
            return batch.shard(self)
        if not isinstance(batch, tuple | list) or not all(isinstance(t, Tensor) for t in batch):
            raise ConfigError(
                "this experiment's batches are not tuples of task tensors; it cannot be "
                "trained with several processes"
            )
        total = batch[0].shape[0]
        if any(t.shape[0] != total for t in batch):
            raise ConfigError("the tensors of a meta-batch have different task dimensions")
        if total < self.size:
            raise ConfigError(
                f"a meta-batch of {total} tasks cannot be split over {self.size} processes"
            )
        lo, hi = shard_bounds(total, self.rank, self.size)
        return tuple(t[lo:hi] for t in batch), (hi - lo) / total

    def reduce_step(
        self,
        module: nn.Module,
        metrics: dict[str, float | Tensor],
        weight: float,
        flags: Sequence[bool],
        where: str = "",
    ) -> tuple[dict[str, float], list[bool]]:
        params = [p for p in module.parameters() if p.requires_grad]
        grads = [p.grad for p in params]
        dtype = torch.float32
        for g in grads:
            if g is not None:
                dtype = torch.promote_types(dtype, g.dtype)
        dev = next((g.device for g in grads if g is not None), self.device)
        parts = [
            (g.detach() if g is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
            for p, g in zip(params, grads, strict=True)
        ]
        tail = torch.tensor(
            [*map(float, metrics.values()), *(1.0 if f else 0.0 for f in flags)],
            dtype=dtype,
            device=dev,
        )
        flat = torch.cat([*parts, tail])
        n_weighted = flat.numel() - len(flags)
        flat[:n_weighted] *= weight
        self._guard(where or "an all-reduce", lambda: self._dist.all_reduce(flat))
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = p.numel()
            if g is not None:  # a parameter without a gradient keeps none (as in one process)
                g.copy_(flat[offset : offset + n].view_as(g))
            offset += n
        values = flat[offset:].tolist()
        reduced = dict(zip(metrics, values[: len(metrics)], strict=True))
        return reduced, [v > 0 for v in values[len(metrics) :]]

    def all_reduce(self, tensor: Tensor, where: str = "") -> Tensor:
        out = tensor.detach().clone()
        self._guard(where or "an all-reduce", lambda: self._dist.all_reduce(out))
        return out

    def sum_rows(self, rows: Tensor, where: str = "") -> Tensor:
        rows = rows.detach().contiguous()
        what = where or "an all-gather"
        count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
        counts = [torch.zeros_like(count) for _ in range(self.size)]
        self._guard(what, lambda: self._dist.all_gather(counts, count))
        most = int(max(int(c) for c in counts))
        padded = rows.new_zeros((most, *rows.shape[1:]))
        padded[: rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        self._guard(what, lambda: self._dist.all_gather(parts, padded))
        return torch.cat([p[: int(c)] for p, c in zip(parts, counts, strict=True)]).sum(0)

    def broadcast_module(self, module: nn.Module, where: str = "") -> None:
        def run() -> None:
            with torch.no_grad():
                for t in module.state_dict().values():
                    self._dist.broadcast(t, src=0)

        self._guard(where or "the parameter broadcast", run)

    def broadcast_object(self, obj: T, where: str = "") -> T:
        box = [obj]
        self._guard(where or "a broadcast", lambda: self._dist.broadcast_object_list(box, src=0))
        return box[0]

    def on_main(self, fn: Callable[[], T], where: str = "") -> T:
        if self.is_main:
            try:
                result = fn()
            except MetagradError as e:
                self.broadcast_object(("error", str(e)), where)
                raise
            except BaseException:
                self.broadcast_object(("error", "rank 0 failed"), where)
                raise
            self.broadcast_object(("ok", result), where)
            return result
        status, result = self.broadcast_object(None, where)
        if status == "error":
            raise PeerFailed(result)
        return result

    def barrier(self, where: str = "") -> None:
        self._guard(where or "a barrier", self._barrier)

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


_joined_group = False  # set once this process joins a process group


def joined_group() -> bool:
    """Whether this process joined a ``torch.distributed`` process group."""
    return _joined_group


def exit_rank(code: int) -> NoReturn:
    """End a process that joined a process group: flush stdout/stderr, ``os._exit(code)``.

    This skips the interpreter's teardown, where torch 2.13's gloo threads sometimes abort
    a rank that finished or failed cleanly ("terminate called without an active
    exception", SIGABRT, after ``destroy_process_group``): seen in 3 of ~50 runs of the
    distributed tests here, which then reported a crashed rank. Call it only after the
    process group is destroyed and every output file is closed.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _wait_for_store(env: WorldEnv, timeout_s: float) -> None:
    """Return once rank 0's rendezvous port accepts connections; raise after ``timeout_s``.

    c10d would time out too, but only after retrying for up to twice as long and with
    pages of C++ log; this gives one line at the timeout.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((env.master_addr, env.master_port), max(0.05, left)):
                return
        except OSError as e:
            if time.monotonic() + 0.2 >= deadline:
                raise DistributedError(
                    f"could not reach the rendezvous at {env.master_addr}:{env.master_port} "
                    f"within {timeout_s:g} s "
                    f"({e.strerror or e}); check that rank 0 is running, that MASTER_ADDR and "
                    "MASTER_PORT point to it and that the port is open (--dist-timeout sets "
                    "the wait)"
                ) from None
            time.sleep(0.2)


def _host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr


def init_world(
    env: WorldEnv | None, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S
) -> World:
    """A :class:`DistributedWorld` for a multi-process ``env``, else a single-process
    :class:`World`. On GPUs each rank uses ``cuda:LOCAL_RANK``."""
    if env is None or env.world_size == 1:
        return World()
    if timeout_s <= 0:
        raise ConfigError(f"bad value {timeout_s!r} for --dist-timeout: must be > 0")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if env.local_rank >= count:
            raise ConfigError(
                f"LOCAL_RANK={env.local_rank} but this machine has {count} GPU(s): start at "
                "most one process per GPU, or train on --device cpu"
            )
        device = torch.device("cuda", env.local_rank)
    return DistributedWorld(env, device, timeout_s)


def world_device(env: WorldEnv | None, device: torch.device) -> torch.device:
    """The device a rank trains on: ``cuda:LOCAL_RANK`` when training on GPUs."""
    if env is not None and env.world_size > 1 and device.type == "cuda":
        return torch.device("cuda", env.local_rank)
    return device


# ------------------------------------------------------------------------ launcher
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _reported(code: int) -> bool:
    """A rank's exit status that says it stopped on its own terms: 2 (it printed its error)
    or 128 + SIGINT/SIGTERM (it was asked to stop and checkpointed)."""
    return code == 2 or code - 128 in (signal.SIGINT, signal.SIGTERM)


def launch(
    command: Sequence[str],
    nproc: int,
    *,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    grace_s: float = 10.0,
    term_grace_s: float = 5.0,
    env: Mapping[str, str] | None = None,
    hint: str = "",
) -> int:
    """Run ``command`` as ``nproc`` local ranks of one process group and wait for them.

    Each process gets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
    ``MASTER_ADDR`` and ``MASTER_PORT`` (a free port unless given). ``OMP_NUM_THREADS``
    defaults to the cores divided among the processes. SIGINT and SIGTERM are passed on to
    the processes (they stop at the end of the iteration and rank 0 checkpoints).

    When a process fails, the others get ``grace_s`` seconds to notice and exit, then
    SIGTERM, and ``term_grace_s`` later SIGKILL. Returns 0 when all succeeded, 2 when one
    failed with an error it printed itself, 128 + the signal when they stopped on SIGINT or
    SIGTERM; raises :class:`DistributedError` when one crashed or was killed (``hint`` is
    appended to that message).
    """
    if nproc < 1:
        raise ConfigError(f"bad value {nproc} for --nproc: must be >= 1")
    port = master_port or free_port(master_addr)
    base = dict(os.environ if env is None else env)
    base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    base.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")  # c10d's own logs duplicate our errors
    procs: list[subprocess.Popen] = []

    def forward(signum: int, _frame: Any) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, forward)
    except ValueError:  # not in the main thread
        pass
    culprit: tuple[int, int] | None = None
    deadline = term_deadline = float("inf")
    try:
        for rank in range(nproc):
            child = base | {
                "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": master_addr,
                "MASTER_PORT": str(port),
            }  # fmt: skip
            procs.append(subprocess.Popen(list(command), env=child))
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                break
            failed = [(r, c) for r, c in enumerate(codes) if c is not None and c != 0]
            if failed and culprit is None:
                culprit = next(((r, c) for r, c in failed if not _reported(c)), failed[0])
                deadline = time.monotonic() + grace_s
            now = time.monotonic()
            if now > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                deadline, term_deadline = float("inf"), now + term_grace_s
            if now > term_deadline:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                term_deadline = float("inf")
            time.sleep(0.05)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for p in procs:  # never leave a rank behind, whatever happened here
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    if all(c == 0 for c in codes):
        return 0
    if culprit is None:  # all failed in the same poll
        failed = [(r, c) for r, c in enumerate(codes) if c != 0]
        culprit = next(((r, c) for r, c in failed if not _reported(c)), failed[0])
    rank, code = culprit
    if _reported(code):  # its own one-line report, or a requested stop
        return code
    raise DistributedError(
        f"rank {rank} of {nproc} (pid {procs[rank].pid}) {_describe_exit(code)}; the other "
        f"processes stopped too{'; ' + hint if hint else ''}"
    )
