"""Meta-iterations per second of ``metagrad train PRESET --nproc N`` for several N.

Run: ``python benchmarks/bench_nproc.py PRESET [--nproc 1,2] [--iters 100] [--rounds 2]
[--data-dir DIR] [--set KEY=VALUE ...]``, e.g.::

    python benchmarks/bench_nproc.py omniglot-5w1s --data-dir ../shared/data/omniglot \\
        --nproc 1,2 --iters 100 --rounds 2 --set val_every=0

The runs are interleaved (N=1, N=2, N=1, N=2, ...), each a fresh ``metagrad train`` into
a temporary run directory with ``--no-eval --quiet``, logging every 10 iterations and no
checkpoint before the last iteration; torch threads per process are the preset's
``threads`` (1 for the shipped presets). The rate is taken from ``metrics.csv`` between
the first and the last logged iteration, so it leaves out start-up, data loading and the
first 10 iterations; the wall time of the whole command is reported beside it. Medians
over rounds.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one_run(args: argparse.Namespace, nproc: int, out: Path) -> tuple[float, float]:
    """(iterations per second in the training loop, wall seconds of the command)."""
    cmd = [sys.executable, "-m", "metagrad", "train", args.preset, "--out", str(out),
           "--nproc", str(nproc), "--no-eval", "--quiet", "--set", f"iterations={args.iters}",
           "--set", "log_every=10", "--set", f"checkpoint_every={args.iters + 1}"]  # fmt: skip
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    for item in args.set:
        cmd += ["--set", item]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    with (out / "metrics.csv").open(newline="") as f:
        rows = [(float(r["iteration"]), float(r["elapsed_s"])) for r in csv.DictReader(f)]
    (i0, t0), (i1, t1) = rows[0], rows[-1]
    return (i1 - i0) / (t1 - t0), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("preset")
    ap.add_argument("--nproc", default="1,2", help="comma-separated process counts")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--data-dir")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    counts = [int(n) for n in args.nproc.split(",")]
    rates: dict[int, list[float]] = {n: [] for n in counts}
    walls: dict[int, list[float]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for n in counts:
                rate, wall = one_run(args, n, Path(tmp) / f"r{r}-n{n}")
                rates[n].append(rate)
                walls[n].append(wall)
                print(f"round {r + 1}, {n} process(es): {rate:.3f} it/s, {wall:.1f} s wall",
                      flush=True)  # fmt: skip
    base = statistics.median(rates[counts[0]])
    print(f"\n{args.preset}, {args.iters} iterations, median of {args.rounds} rounds")
    print("| processes | meta-it/s (median) | all rounds | speed-up | wall s (median) |")
    print("|---|---|---|---|---|")
    for n in counts:
        med = statistics.median(rates[n])
        each = ", ".join(f"{x:.3f}" for x in rates[n])
        print(
            f"| {n} | {med:.3f} | {each} | {med / base:.2f}x | {statistics.median(walls[n]):.1f} |"
        )


if __name__ == "__main__":
    main()
