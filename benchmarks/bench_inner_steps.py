"""Peak memory and time per meta-iteration against the number of inner steps.

MAML (second order), MAML with the inner loop checkpointed, FOMAML, iMAML and Reptile on
the paper's Omniglot network (conv4, 64 filters), 20-way 1-shot, on generated 28x28 images
(the cost does not depend on the pixels). Each (method, steps) runs in a fresh process:
peak resident memory (ru_maxrss) above the process's memory before the first
meta-iteration, and the median time of the timed meta-iterations after one warm-up.

    python benchmarks/bench_inner_steps.py                      # steps 1,5,10,20
    python benchmarks/bench_inner_steps.py --steps 1,5 --iters 2 --tasks 2

Results: ``benchmarks/results/DATE-inner-steps.{json,md}`` and ``docs/inner-steps.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("maml", "maml-checkpoint", "fomaml", "imaml", "reptile")
ROOT = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def worker(method: str, steps: int, tasks: int, iters: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    import metagrad as mg
    from metagrad.models import omniglot_conv4

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ways, queries = 20, 1
    model = omniglot_conv4(ways, 64)
    g = torch.Generator().manual_seed(0)
    sx = torch.rand(tasks, ways, 1, 28, 28, generator=g)
    qx = torch.rand(tasks, ways * queries, 1, 28, 28, generator=g)
    sy = torch.arange(ways).repeat(tasks, 1)
    qy = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    common = {"inner_lr": 0.1, "inner_steps": steps}
    if method == "imaml":
        learner = mg.iMAML(model, F.cross_entropy, lam=2.0, cg_steps=5, **common)
    elif method == "reptile":
        learner = mg.Reptile(model, F.cross_entropy, **common)
    else:
        learner = mg.MAML(
            model, F.cross_entropy, first_order=method == "fomaml",
            checkpoint=method == "maml-checkpoint", vectorize=False, **common,
        )  # fmt: skip
    before = rss_mib()
    times = []
    for i in range(iters + 1):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        learner.meta_backward(sx, sy, qx, qy)
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "method": method, "steps": steps, "tasks": tasks, "threads": threads,
        "peak_mib_above_start": round(peak - before, 1),
        "seconds": round(statistics.median(times), 3), "times": [round(t, 3) for t in times],
    }  # fmt: skip


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for method in METHODS:
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["steps"])
        if not rs:
            continue
        steps = [r["steps"] for r in rs]
        a.plot(steps, [r["peak_mib_above_start"] for r in rs], "o-", label=method)
        b.plot(steps, [r["seconds"] for r in rs], "o-", label=method)
    a.set(xlabel="inner steps", ylabel="peak memory above start (MiB)", title="memory")
    b.set(xlabel="inner steps", ylabel="seconds per meta-iteration", title="time")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    a.legend()
    fig.suptitle(f"Omniglot conv4, 20-way 1-shot, {rows[0]['tasks']} tasks per meta-batch, CPU")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", default="1,5,10,20")
    ap.add_argument("--tasks", type=int, default=4, help="tasks per meta-batch")
    ap.add_argument("--iters", type=int, default=2, help="timed meta-iterations (after 1 warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--figure", default=str(ROOT / "docs" / "inner-steps.png"))
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        method, steps = args.worker
        print(json.dumps(worker(method, int(steps), args.tasks, args.iters, args.threads)))
        return
    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--worker", method, str(steps)]
            cmd += ["--tasks", str(args.tasks), "--iters", str(args.iters)]
            cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{method} at {steps} steps failed:\n{proc.stderr[-2000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    header = (
        f"# Peak memory and time per meta-iteration vs inner steps\n\n"
        f"Omniglot conv4 (64 filters), 20-way 1-shot, {args.tasks} tasks per meta-batch, "
        f"{args.threads} threads, {platform.processor() or platform.machine()}; "
        f"median of {args.iters} timed meta-iterations after 1 warm-up, each (method, steps) "
        f"in a fresh process.\n\n`python benchmarks/bench_inner_steps.py "
        f"--steps {args.steps} --tasks {args.tasks} --iters {args.iters}`\n\n"
        "| method | steps | peak MiB above start | s / meta-iteration |\n|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['method']} | {r['steps']} | {r['peak_mib_above_start']:.0f} | {r['seconds']:.2f} |\n"
        for r in sorted(rows, key=lambda r: (METHODS.index(r["method"]), r["steps"]))
    )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{time.strftime('%Y-%m-%d')}-inner-steps"
    stem.with_suffix(".json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(header + body)
    plot(rows, Path(args.figure))
    print(header + body)


if __name__ == "__main__":
    main()
