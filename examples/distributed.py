"""Data-parallel meta-training from Python: N processes, each computing the meta-gradient of
its share of every meta-batch, averaged with one all-reduce.

What it shows: starting N processes with ``torch.multiprocessing.spawn`` and a
``torch.distributed`` process group (NCCL with one GPU per process when there are enough
GPUs, else gloo on CPU); every process draws the same seeded meta-batch and keeps its slice
of the tasks; ``maml.meta_backward`` on the slice; the gradients weighted by each slice's
share of the tasks and summed with ``all_reduce``, so every process takes the same
optimizer step and holds the same parameters. ``--check`` (on with ``--smoke``) also trains
in one process and compares: the result is the single-process one up to float rounding.

``metagrad train PRESET --nproc N`` (and ``torchrun ... -m metagrad train PRESET``) does all
of this for the presets; this script is for your own training loop.

    python examples/distributed.py --nproc 2
    python examples/distributed.py --smoke     # 2 processes, a few iterations, checked
"""

from __future__ import annotations

import argparse
import math
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

import metagrad as mg
from metagrad.experiments.distributed import exit_rank


def shard_bounds(total: int, rank: int, world: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``'s tasks; the slices cover ``0..total`` exactly."""
    return total * rank // world, total * (rank + 1) // world


def train(rank: int, world: int, args: argparse.Namespace, device: torch.device) -> mg.MAML:
    """Meta-train with this rank's slice of every meta-batch (``world == 1``: all of it)."""
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))  # fmt: skip
    maml = mg.MAML(model, F.mse_loss, inner_lr=0.01, inner_steps=1).to(device)
    params = list(maml.parameters())
    if world > 1:  # start from rank 0's parameters, however each rank built its model
        for p in params:
            dist.broadcast(p.data, src=0)
    opt = torch.optim.Adam(params, lr=1e-3)
    tasks = mg.tasks.SinusoidTasks()
    g = torch.Generator().manual_seed(args.seed)  # the same task stream on every rank
    for it in range(1, args.iterations + 1):
        batch = tasks.sample(args.meta_batch, 10, 10, g).tensors()  # the whole meta-batch
        lo, hi = shard_bounds(args.meta_batch, rank, world)
        opt.zero_grad()
        loss = maml.meta_backward(*(t[lo:hi].to(device) for t in batch))  # this slice's mean
        if world > 1:
            # the meta-loss is a mean over tasks: weight each slice's mean by its share, so
            # the sum over ranks is the mean over the whole meta-batch (slices may differ in size)
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([gr.flatten() for gr in grads] + [loss.view(1)]) * ((hi - lo) / args.meta_batch)  # fmt: skip
            dist.all_reduce(flat)  # one collective for all gradients (and the loss, for logging)
            for p, new in zip(params, flat[:-1].split([p.numel() for p in params]), strict=True):
                p.grad = new.view_as(p)
            loss = flat[-1]
        opt.step()  # the same gradient on every rank: the same step
        if rank == 0 and (it % max(args.iterations // 5, 1) == 0 or it == 1):
            print(f"[{world} process{'es' if world > 1 else ''}] iteration {it:5d}  "
                  f"meta-loss {loss.item():.3f}", flush=True)  # fmt: skip
    return maml


def flat_params(maml: mg.MAML) -> Tensor:
    return torch.cat([p.detach().flatten() for p in maml.parameters()])


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    """One process (``mp.spawn`` passes ``rank`` first)."""
    if args.device == "cuda":  # one GPU per process, NCCL between them
        torch.cuda.set_device(rank)
        device, backend = torch.device("cuda", rank), "nccl"
    else:  # CPU processes: one thread each, so N processes use N cores
        torch.set_num_threads(1)
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)  # fmt: skip
    try:
        maml = train(rank, world, args, device)
        final = flat_params(maml)
        # every rank should hold rank 0's parameters: the largest difference over all ranks
        ref = final.clone()
        dist.broadcast(ref, src=0)
        diff = (final - ref).abs().max().view(1)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        if rank == 0:
            print(f"{world} processes on {device.type} ({backend}): largest parameter "
                  f"difference between ranks {diff.item():.1e}", flush=True)  # fmt: skip
            assert diff.item() <= 1e-6, "the ranks' parameters differ"
            torch.save(final.cpu(), Path(out) / "rank0.pt")
            # what was learned: held-out tasks, MSE before and after one inner step
            test = mg.tasks.SinusoidTasks().sample(100, 10, 100, torch.Generator().manual_seed(1234))  # fmt: skip
            batch = [t.to(device) for t in test.tensors()]
            mse = maml.adaptation_curve(*batch, steps=1, metrics={"mse": F.mse_loss})["mse"]
            print(f"100 test tasks, MSE before adaptation {mse[:, 0].mean().item():.3f}, "
                  f"after one step {mse[:, 1].mean().item():.3f}", flush=True)  # fmt: skip
    finally:
        dist.destroy_process_group()
    # torch 2.13's gloo threads sometimes abort a rank that finished cleanly at interpreter
    # teardown (SIGABRT, "terminate called without an active exception"): skip the teardown
    exit_rank(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes (GPUs, when on CUDA)")
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--meta-batch", type=int, default=25)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--check", action="store_true", help="compare with one process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, checked")
    args = parser.parse_args(argv)
    if args.smoke:  # 5 tasks over 2 processes: slices of 2 and 3 tasks
        args.nproc, args.iterations, args.meta_batch, args.check = 2, 5, 5, True
    if args.nproc > args.meta_batch:
        parser.error("every process needs a task: --nproc at most --meta-batch")
    if args.device == "auto":  # NCCL needs one GPU per process
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        args.device = "cuda" if gpus >= args.nproc else "cpu"
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        parser.error(f"--device cuda needs {args.nproc} GPUs, found {torch.cuda.device_count()}")

    with tempfile.TemporaryDirectory() as out:
        # spawn: fresh interpreters (safe with CUDA); join: wait, and raise if one failed
        mp.spawn(worker, args=(args.nproc, free_port(), args, out), nprocs=args.nproc, join=True)
        parallel = torch.load(Path(out) / "rank0.pt", weights_only=True)

    result = {"params": float(parallel.numel())}
    if args.check:
        device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
        single = flat_params(train(0, 1, args, device)).cpu()
        diff = (parallel - single).abs().max().item()
        print(f"{args.nproc} processes against 1: largest parameter difference {diff:.1e}")
        # the same update up to float rounding (the order of the sum differs)
        assert torch.allclose(parallel, single, rtol=1e-4, atol=1e-5), diff
        result["difference"] = diff
    assert math.isfinite(parallel.sum().item())
    return result


if __name__ == "__main__":
    main()
