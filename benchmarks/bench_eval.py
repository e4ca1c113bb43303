"""How fast is few-shot evaluation (``MAML.adaptation_curve``) in each memory layout?

Run: ``python benchmarks/bench_eval.py --preset omniglot-20w5s-mamlpp [--tasks T] [--rounds R]``

Evaluation adapts each test task first order and then runs its query set at every step
(0..``eval_steps``), so with 15 queries per class the query passes, not the adaptation,
take most of its time. This script times one ``adaptation_curve`` call on ``--tasks``
tasks of the preset's shapes (random images, the preset's network at its initialization),
with the query passes contiguous and in ``channels_last`` (the CPU default for conv nets),
interleaved (A B A B), and checks that both give the same curve. Prints a markdown table
(medians) and writes it to ``benchmarks/results/<date>-<preset>-eval.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from bench_maml import RESULTS, machine, write_report

from metagrad.experiments.config import preset
from metagrad.experiments.options import build_learner
from metagrad.experiments.registry import experiment_for


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="omniglot-20w5s-mamlpp")
    p.add_argument("--tasks", type=int, default=5, help="tasks per timed call")
    p.add_argument("--queries", type=int, default=0, help="query images per class (0: the preset's eval_queries)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = preset(args.preset)
    if cfg["experiment"] not in ("omniglot", "miniimagenet"):
        p.error(f"{args.preset} is not an Omniglot or MiniImagenet preset")
    torch.manual_seed(0)
    net = experiment_for(cfg, torch.device("cpu")).network()
    ways, shots = cfg["ways"], cfg["shots"]
    queries = args.queries or cfg["eval_queries"]
    image = (1, 28, 28) if cfg["experiment"] == "omniglot" else (3, 84, 84)
    labels = torch.arange(ways)
    batch = (
        torch.rand(args.tasks, ways * shots, *image),
        labels.repeat(args.tasks, shots),
        torch.rand(args.tasks, ways * queries, *image),
        labels.repeat(args.tasks, queries),
    )
    steps = cfg["eval_steps"]
    learners = {
        layout: build_learner(net, F.cross_entropy, cfg, vectorize=False, channels_last=cl)
        for layout, cl in (("contiguous", False), ("channels_last", True))
    }
    times: dict[str, list[float]] = {k: [] for k in learners}
    curves = {}
    for r in range(args.rounds + 1):  # round 0 warms up
        for layout, maml in learners.items():
            t0 = time.perf_counter()
            curves[layout] = maml.adaptation_curve(*batch, steps, {"loss": F.cross_entropy})["loss"]  # fmt: skip
            if r:
                times[layout].append(time.perf_counter() - t0)
        print(f"[{args.preset}] round {r}/{args.rounds}", file=sys.stderr, flush=True)
    same = torch.allclose(curves["channels_last"], curves["contiguous"], rtol=1e-4, atol=1e-5)
    med = {k: statistics.median(v) / args.tasks for k, v in times.items()}
    lines = [
        f"## Evaluation speed: {args.preset}, CPU",
        "",
        f"One `adaptation_curve` call on {args.tasks} tasks ({ways}-way {shots}-shot, {queries} "
        f"queries per class, {steps} first-order steps, the query set after each), per-task "
        f"loop; {args.rounds} rounds interleaved, {torch.get_num_threads()} threads. Machine: "
        f"{machine()['cpu']}, torch {torch.__version__}.",
        f"Command: `python benchmarks/bench_eval.py {' '.join(argv or sys.argv[1:])}`".rstrip(),
        "",
        "| query passes | median s / task | speed-up |",
        "|---|---:|---:|",
        *(f"| {k} | {v:.3f} | {med['contiguous'] / v:.2f} |" for k, v in med.items()),
        "",
        f"Same curve in both layouts (rtol 1e-4): {'yes' if same else 'NO'}.",
    ]
    return write_report(lines, args.out_dir, f"{args.preset}-eval")


if __name__ == "__main__":
    main()
