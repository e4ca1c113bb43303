"""Where a meta-RL meta-iteration spends its time.

Run: ``python benchmarks/profile_rl.py [--preset rl-nav2d] [--iters 3] [--threads 1]
[--set key=value ...]``. Builds the preset's experiment (full settings unless ``--set``
shrinks them), runs one warm-up meta-iteration, then profiles ``--iters`` more with cProfile
and prints the median wall time per iteration and the cumulative time of the phases of
:meth:`MAMLTRPO.step`:
sampling paths, processing them (baseline fit, advantages), the inner adaptation, the
TRPO gradient, the Hessian-vector products of the conjugate gradient and the line search.
Phases nest (the line search re-adapts), so the shares need not add up to 100%.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
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
    ("  building the exact KL Hessian product", "core/linalg.py", "hvp_exact"),
    ("  building the Fisher product", "rl/maml_trpo.py", "fisher_product"),
    ("  conjugate gradient (10 products)", "core/linalg.py", "conjugate_gradient_residual"),
    ("  line search", "rl/trpo.py", "line_search"),
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="rl-nav2d")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--plain", action="store_true", help="time only, without cProfile")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = apply_overrides(preset(args.preset) | {"preset": args.preset}, args.set)
    exp = experiment_for(cfg)
    torch.manual_seed(cfg["seed"])
    maml = exp.build()
    generator = torch.Generator().manual_seed(cfg["seed"])
    exp.train_step(maml, exp.sample(generator))  # warm-up: env construction, first calls
    profile = cProfile.Profile()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        if not args.plain:
            profile.enable()
        exp.train_step(maml, exp.sample(generator))
        profile.disable()
        times.append(time.perf_counter() - start)
    if args.plain:
        print(f"{args.preset} {' '.join(args.set)}: {statistics.median(times):.2f} s per "
              f"meta-iteration (median of {args.iters}: {', '.join(f'{t:.2f}' for t in times)}; "
              f"{args.threads} torch thread(s))")  # fmt: skip
        return
    per_iter = sum(times) / len(times)
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    print(f"{args.preset} {' '.join(args.set)}: {statistics.median(times):.2f} s per "
          f"meta-iteration (median of {args.iters}: {', '.join(f'{t:.2f}' for t in times)}; "
          f"under cProfile, {args.threads} torch thread(s))")  # fmt: skip
    print("phases (mean per iteration):")
    for label, file, name in PHASES:
        cum = sum(v[3] for (f, _, n), v in stats.items() if f.endswith(file) and n == name)
        print(
            f"  {label:<36} {cum / args.iters:7.3f} s  {100 * cum / args.iters / per_iter:5.1f} %"
        )
    print("top 15 functions by own time:")
    pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
