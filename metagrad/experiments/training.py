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
from contextlib import contextmanager
from typing import Any

import torch
from tqdm import tqdm

from ..core import MAML
from ..errors import MetagradError
from .base import Experiment
from .distributed import World
from .runs import BEST, CHECKPOINT, Run


class Interrupted(MetagradError):
    pass


@contextmanager
def _deferred_interrupts():
    """Turn SIGINT/SIGTERM into a flag checked between iterations, so that a checkpoint
    is never taken in the middle of an optimizer step."""
    flag = {"stop": None}

    def handler(signum, _frame):
        flag["stop"] = signal.Signals(signum).name

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
    generator = torch.Generator().manual_seed(cfg["seed"])
    start, elapsed, best = 0, 0.0, None
    # rank 0 reads the checkpoint and hands it to the others (no shared disk needed)
    state = world.on_main(
        lambda: run.load(CHECKPOINT) if run.has_checkpoint() else None, "loading the checkpoint"
    )
    if state is not None:
        maml.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
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
                "generator": generator.get_state(),
                "rng": _rng_state(),
                "iteration": iteration,
                "elapsed_s": elapsed,
                "best": best,
                "extra": extra or {},
            }
        )

    total = cfg["iterations"]
    fields = ["iteration", "elapsed_s", *exp.train_metrics, *exp.val_metrics]
    show = progress and main  # only rank 0 shows a progress bar
    bar = tqdm(
        total=total, initial=start, desc=cfg.get("preset", "train"), disable=not show,
        unit="it", dynamic_ncols=True, mininterval=0.5,
    )  # fmt: skip
    log_every, val_every = max(cfg["log_every"], 1), cfg.get("val_every", 0)
    ckpt_every = max(cfg["checkpoint_every"], 1)
    sums: dict[str, float] = {}
    count = 0
    with _deferred_interrupts() as flag:
        tick = time.perf_counter()
        for it in range(start, total):
            batch, weight = world.shard(exp.sample(generator))
            opt.zero_grad(set_to_none=True)
            metrics = exp.train_step(maml, batch)
            limit = cfg.get("time_limit_min", 0)
            over = bool(limit) and elapsed + time.perf_counter() - tick >= 60 * limit
            # several processes: average gradients and metrics, and agree on stopping
            metrics, (over, stop) = world.reduce_step(
                maml, metrics, weight, (over, flag["stop"] is not None), f"iteration {it + 1}"
            )
            opt.step()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            done = it + 1
            if over:
                total = done  # the wall-time budget is spent: this is the last iteration
            row: dict[str, Any] = {}
            if done % log_every == 0 or done == total:
                row = {k: float(sums[k]) / count for k in sums}
                sums, count = {}, 0
                bar.set_postfix({k: f"{v:.4g}" for k, v in row.items()}, refresh=False)
            if main and val_every and (done % val_every == 0 or done == total):
                val = exp.validate(maml)
                row.update(val)
                score = val.get(exp.select_metric) if exp.select_metric else None
                if score is not None and (best is None or score > best):
                    best = score
                    run.save({"model": maml.state_dict(), "iteration": done, "score": score}, BEST)
            if row:
                now = time.perf_counter()
                elapsed, tick = elapsed + now - tick, now
                full = {"iteration": done, "elapsed_s": round(elapsed, 3)}
                full.update({k: row.get(k, "") for k in fields[2:]})
                if main:
                    run.append_metrics(full)
            bar.update(1)
            if done % ckpt_every == 0 and done != total:
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
                    f"run the same command again to resume"
                )
        elapsed += time.perf_counter() - tick
    bar.close()
    extra = world.on_main(lambda: exp.finalize(maml), "the final step")
    exp.apply_extra(maml, extra)
    checkpoint(max(total, start), extra | {"final_iteration": max(total, start)})
    world.barrier("the end of training")  # every rank returns after the final checkpoint
    return maml
