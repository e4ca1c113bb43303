"""The meta-training loop: sampling, optimizer steps, logging, checkpoints and resume.

Resume is exact: a checkpoint holds the model, the optimizer, the task sampler's and
torch's RNG states and the iteration, so a run that was stopped and resumed ends with
the same parameters as one that ran straight through with the same seed.

Data-parallel training: pass a :class:`~metagrad.experiments.distributed.World` of several
processes; each rank trains on its shard of every meta-batch, the gradients are averaged
before the optimizer step, and only rank 0 writes the run directory and validates (see
:mod:`metagrad.experiments.distributed`).
"""

from __future__ import annotations

import signal
import time
from contextlib import closing, contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from ..core import MAML
from ..errors import MetagradError
from .base import Experiment
from .distributed import World
from .runs import BEST, CHECKPOINT, Run
from .tensorboard import board


class Interrupted(MetagradError):
    """Training stopped on SIGINT or SIGTERM after checkpointing. ``signum``: the signal this
    process got (``None``: a rank stopped because another one got it). Not a failure: the
    command exits ``128 + signum``, the shell's status for a process ended by that signal."""

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)


class Diverged(MetagradError):
    """The meta-loss or the meta-gradient became NaN or infinite."""


# the config values that, lowered, most often cure a divergence
_LOWER = ("meta_lr", "inner_lr", "max_kl")


def _finite(metrics: dict[str, Any], maml: MAML) -> Tensor:
    """[every metric finite, every gradient finite] as a bool tensor, on the model's device
    and without a device sync. Experiments that update the parameters themselves (TRPO)
    leave no gradients: their parameters are checked instead."""
    params = list(maml.parameters())
    device = params[0].device
    grads = [p.grad for p in params if p.grad is not None] or params
    values = [torch.as_tensor(v, device=device, dtype=torch.float32) for v in metrics.values()]
    metrics_ok = torch.stack([torch.isfinite(v).all() for v in values]).all() if values else (
        torch.ones((), dtype=torch.bool, device=device))  # fmt: skip
    grads_ok = torch.stack([torch.isfinite(g).all() for g in grads]).all()
    return torch.stack([metrics_ok, grads_ok])


def _diverged(cfg: dict[str, Any], run: Run, iteration: int, ok: Tensor) -> Diverged:
    what = "the meta-loss" if not ok[0] else "the meta-gradient"
    if run.has_checkpoint():
        kept = f"{run.path / CHECKPOINT} is kept as it was"
    else:
        kept = "no checkpoint had been written yet"
    lower = ", ".join(f"{k} (now {cfg[k]:g})" for k in _LOWER if k in cfg)
    return Diverged(
        f"training diverged at iteration {iteration}: {what} is not finite (NaN or inf); "
        f"{kept}; try lowering {lower}, or --set on_nonfinite=skip to skip such steps"
    )


@contextmanager
def _deferred_interrupts():
    """Turn SIGINT/SIGTERM into a flag checked between iterations, so that a checkpoint
    is never taken in the middle of an optimizer step."""
    flag: dict[str, Any] = {"stop": None, "signum": None}

    def handler(signum, _frame):
        flag["stop"], flag["signum"] = signal.Signals(signum).name, signum

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not in the main thread: leave signals alone
        pass
    try:
        yield flag
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(exp: Experiment, run: Run, *, progress: bool = True, world: World | None = None) -> MAML:
    """Train ``exp`` into ``run``, resuming from its checkpoint when there is one.

    ``world``: the processes training together (default: this one alone).
    """
    world = world or World()
    main = world.is_main
    cfg = exp.cfg
    torch.manual_seed(cfg["seed"])
    maml = exp.build().to(exp.device)
    opt = exp.optimizer(maml)
    schedule = exp.scheduler(opt)
    generator = torch.Generator().manual_seed(cfg["seed"])
    start, elapsed, best = 0, 0.0, None
    # rank 0 reads the checkpoint and hands it to the others (no shared disk needed)
    state = world.on_main(
        lambda: run.load(CHECKPOINT) if run.has_checkpoint() else None, "loading the checkpoint"
    )
    if state is not None:
        maml.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if schedule is not None and state.get("scheduler") is not None:
            schedule.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        _set_rng_state(state["rng"])
        start, elapsed, best = state["iteration"], state["elapsed_s"], state.get("best")
        if main:
            run.truncate_metrics(start)
    world.broadcast_module(maml, "the start-up parameter broadcast")

    def checkpoint(iteration: int, extra: dict[str, Any] | None = None) -> None:
        if not main:
            return
        run.save(
            {
                "model": maml.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": None if schedule is None else schedule.state_dict(),
                "generator": generator.get_state(),
                "rng": _rng_state(),
                "iteration": iteration,
                "elapsed_s": elapsed,
                "best": best,
                "skipped": skipped,
                "extra": extra or {},
            }
        )

    total = cfg["iterations"]
    skip = cfg.get("on_nonfinite", "stop") == "skip"
    fields = ["iteration", "elapsed_s", *exp.train_metrics, *exp.val_metrics]
    fields += ["nonfinite_skipped"] if skip else []
    skipped = state.get("skipped", 0) if state is not None else 0
    # the first non-finite step (its iteration, or 0) is kept on the device and read at the
    # next log, validation or checkpoint, before anything is written (a sync every
    # iteration would stall a GPU); on_nonfinite=skip reads every step before it is taken
    bad_at = torch.zeros((), dtype=torch.long, device=exp.device)
    bad_ok = torch.ones(2, dtype=torch.bool, device=exp.device)
    show = progress and main  # only rank 0 shows a progress bar
    bar = tqdm(
        total=total, initial=start, desc=cfg.get("preset", "train"), disable=not show,
        unit="it", dynamic_ncols=True, mininterval=0.5,
    )  # fmt: skip
    log_every, val_every = max(cfg["log_every"], 1), cfg.get("val_every", 0)
    ckpt_every = max(cfg["checkpoint_every"], 1)
    sums: dict[str, float] = {}
    count = 0
    clip = float(cfg.get("clip_grad_value", 0.0))
    tb = board(cfg, run, start) if main else None
    # the event file is closed however the loop ends (done, diverged, interrupted, an error)
    with _deferred_interrupts() as flag, closing(tb) if tb is not None else nullcontext():
        tick = time.perf_counter()
        for it in range(start, total):
            batch, weight = world.shard(exp.sample(generator))
            opt.zero_grad(set_to_none=True)
            maml.schedule(it)  # settings that change over training (MAML++)
            metrics = exp.train_step(maml, batch)
            limit = cfg.get("time_limit_min", 0)
            over = bool(limit) and elapsed + time.perf_counter() - tick >= 60 * limit
            # several processes: average gradients and metrics, and agree on stopping
            metrics, (over, stop) = world.reduce_step(
                maml, metrics, weight, (over, flag["stop"] is not None), f"iteration {it + 1}"
            )
            ok = _finite(metrics, maml)
            done = it + 1
            if skip and not bool(ok.all()):
                skipped += 1  # no optimizer step, and the step's metrics are not averaged
            else:
                if not skip:
                    fresh = (bad_at == 0) & ~ok.all()
                    bad_at = torch.where(fresh, done, bad_at)
                    bad_ok = torch.where(fresh, ok, bad_ok)
                if clip > 0:
                    torch.nn.utils.clip_grad_value_(maml.parameters(), clip)
                opt.step()
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
            if schedule is not None:
                schedule.step()  # per iteration, taken or skipped
            if over:
                total = done  # the wall-time budget is spent: this is the last iteration
            logged = done % log_every == 0 or done == total
            val_due = bool(val_every) and (done % val_every == 0 or done == total)
            saving = done % ckpt_every == 0 and done != total
            # the same on every rank, so that all of them stop at the same iteration
            if (logged or val_due or saving or stop) and not skip and int(bad_at):
                bar.close()  # nothing more is logged, validated or checkpointed
                raise _diverged(cfg, run, int(bad_at), bad_ok)
            row: dict[str, Any] = {}
            if logged:
                row = {k: float(sums[k]) / count for k in sums}
                sums, count = {}, 0
                bar.set_postfix({k: f"{v:.4g}" for k, v in row.items()}, refresh=False)
            if main and val_due:
                val = exp.validate(maml)
                row.update(val)
                score = val.get(exp.select_metric) if exp.select_metric else None
                if score is not None and (best is None or score > best):
                    best = score
                    run.save({"model": maml.state_dict(), "iteration": done, "score": score}, BEST)
            if logged or row:
                now = time.perf_counter()
                elapsed, tick = elapsed + now - tick, now
                full = {"iteration": done, "elapsed_s": round(elapsed, 3)}
                full.update({k: row.get(k, "") for k in fields[2:]})
                if skip:
                    full["nonfinite_skipped"] = skipped
                if main:
                    run.append_metrics(full)
                if tb is not None:
                    tb.log(full, done, maml, opt)
            bar.update(1)
            if saving:
                elapsed, tick = elapsed + time.perf_counter() - tick, time.perf_counter()
                checkpoint(done)
            if done == total:
                break
            if stop:
                elapsed += time.perf_counter() - tick
                checkpoint(done)
                bar.close()
                by = flag["stop"] or "a signal to another process"
                raise Interrupted(
                    f"stopped by {by} at iteration {done}/{total}; checkpoint saved, "
                    f"run the same command again to resume",
                    flag["signum"],
                )
        elapsed += time.perf_counter() - tick
    bar.close()
    extra = world.on_main(lambda: exp.finalize(maml), "the final step")
    exp.apply_extra(maml, extra)
    checkpoint(max(total, start), extra | {"final_iteration": max(total, start)})
    world.barrier("the end of training")  # every rank returns after the final checkpoint
    return maml
