"""Where a meta-RL meta-iteration spends its time.

Run: ``python benchmarks/profile_rl.py [--preset rl-nav2d] [--iters 3] [--set key=value ...]``.
Builds the preset's experiment (full settings unless ``--set`` shrinks them), runs one
warm-up meta-iteration, then profiles ``--iters`` more with cProfile and prints the wall
time per iteration and the cumulative time of the phases of :meth:`MAMLTRPO.step`:
sampling paths, processing them (baseline fit, advantages), the inner adaptation, the
TRPO gradient, the Hessian-vector products of the conjugate gradient and the line search.
Phases nest (the line search re-adapts), so the shares need not add up to 100%.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from metagrad.experiments.config import apply_overrides, preset
from metagrad.experiments.registry import experiment_for

# (label, file suffix, function name) of the phases
PHASES = [
    ("sampling (VectorSampler.sample)", "rl/sampler.py", "sample"),
    ("  the rollout loop (envs, policy)", "rl/sampler.py", "rollout"),
    ("processing (baseline, GAE)", "rl/maml_trpo.py", "process_trajectories"),
    ("inner adaptation (all calls)", "rl/maml_trpo.py", "adapt"),
    ("TRPO step (all of it)", "rl/trpo.py", "trpo_step"),
    ("  conjugate gradient (HVPs)", "core/linalg.py", "conjugate_gradient"),
    ("  line search", "rl/trpo.py", "line_search"),
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="rl-nav2d")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = apply_overrides(preset(args.preset) | {"preset": args.preset}, args.set)
    exp = experiment_for(cfg)
    torch.manual_seed(cfg["seed"])
    maml = exp.build()
    generator = torch.Generator().manual_seed(cfg["seed"])
    exp.train_step(maml, exp.sample(generator))  # warm-up: env construction, first calls
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    for _ in range(args.iters):
        exp.train_step(maml, exp.sample(generator))
    profile.disable()
    per_iter = (time.perf_counter() - start) / args.iters
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    print(f"{args.preset} {' '.join(args.set)}: {per_iter:.2f} s per meta-iteration "
          f"(mean of {args.iters}, under cProfile, 1 torch thread)")  # fmt: skip
    for label, file, name in PHASES:
        cum = sum(v[3] for (f, _, n), v in stats.items() if f.endswith(file) and n == name)
        print(
            f"  {label:<36} {cum / args.iters:7.3f} s  {100 * cum / args.iters / per_iter:5.1f} %"
        )
    print("top 15 functions by own time:")
    pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
