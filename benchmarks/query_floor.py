"""How close is metagrad to the floor set by PyTorch's own kernels on a convnet config?

Run: ``python benchmarks/query_floor.py --config omniglot-5w1s [--rounds R] [--iters N]``

Every exact second-order MAML must at least run each task's query set forward and backward
at that task's adapted weights (the query images outnumber the support images 15 to 1 in
the paper's few-shot configs). This script times, in one process, interleaved (A B C A B C),
on the same batches as ``bench_maml.py``:

- ``metagrad``: one ``MAML.meta_backward`` (default strategy), the whole meta-gradient;
- ``query pass``: only the first-order forward + backward of every task's query set, one
  task at a time, at the unadapted weights (the same kernels, no support side);
- ``query pass, channels_last``: the same with inputs and conv weights in channels_last.

The fastest query pass is a lower bound for any implementation built on these kernels, so
``peer time / floor`` bounds the speed-up over a peer that any such implementation can reach.
Prints a markdown table (medians) and writes it to ``benchmarks/results/<date>-<config>-floor.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from bench_maml import CONFIGS, RESULTS, build, machine, write_report

import metagrad as mg
from metagrad.core import functional as F
from metagrad.core.malloc import keep_freed_memory


def _query_pass(model, loss_fn, batch, channels_last: bool) -> None:  # type: ignore[no-untyped-def]
    params = {k: p.detach() for k, p in model.named_parameters()}
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    tasks = batch[2].shape[0]
    for qx, qy in zip(batch[2], batch[3], strict=True):
        p = {
            k: (v.to(memory_format=fmt) if v.dim() == 4 else v).requires_grad_()
            for k, v in params.items()
        }
        x = qx.to(memory_format=fmt) if qx.dim() == 4 else qx
        loss = loss_fn(F.forward(model, p, {}, x), qy) / tasks
        torch.autograd.grad(loss, list(p.values()))


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--config", default="omniglot-5w1s", choices=[c for c in CONFIGS if c != "sinusoid"]
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=2, help="timed iterations per part and round")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    cfg = CONFIGS[args.config]
    model, loss_fn, batches = build(cfg, 0, torch.float32, "cpu", 3)
    maml = mg.MAML(model, loss_fn, inner_lr=cfg.lr, inner_steps=cfg.steps)
    verdict = maml.strategy(batches[0], steps=cfg.steps, first_order=False)
    parts: dict[str, Callable[[tuple], object]] = {
        "metagrad meta_backward": lambda b: maml.meta_backward(*b),
        "query pass": lambda b: _query_pass(model, loss_fn, b, False),
        "query pass, channels_last": lambda b: _query_pass(model, loss_fn, b, True),
    }
    times: dict[str, list[float]] = {k: [] for k in parts}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, fn in parts.items():
            for i in range(args.iters):
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                fn(batches[i % len(batches)])
                if r:
                    times[name].append(time.perf_counter() - t0)
        print(f"[{args.config}] round {r}/{args.rounds}", file=sys.stderr, flush=True)
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    floor = min(med["query pass"], med["query pass, channels_last"])
    lines = [
        f"## Floor: {args.config}, second order, CPU",
        "",
        f"metagrad strategy: {verdict.name}. {args.rounds} rounds x {args.iters} iterations, "
        f"interleaved, {torch.get_num_threads()} threads. Machine: {machine()['cpu']}, "
        f"torch {torch.__version__}.",
        f"Command: `python benchmarks/query_floor.py {' '.join(argv or sys.argv[1:])}`".rstrip(),
        "",
        "| part | median ms | / floor |",
        "|---|---:|---:|",
        *(f"| {k} | {v:.1f} | {v / floor:.2f} |" for k, v in med.items()),
        "",
        f"floor (fastest query pass): {floor:.1f} ms; metagrad spends "
        f"{med['metagrad meta_backward'] - floor:.1f} ms beyond it.",
    ]
    return write_report(lines, args.out_dir, f"{args.config}-floor")


if __name__ == "__main__":
    main()
