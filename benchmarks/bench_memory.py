"""Resident memory over a long training run: does it grow after warm-up?

Trains ``--iterations`` meta-iterations (default 1,000) through the real training loop
(logging, checkpoints) with each execution strategy (loop, vmap, support), each in a fresh
process, and records the process's resident set size (VmRSS) every 100 iterations:

    python benchmarks/bench_memory.py                      # sinusoid and Omniglot conv+BN
    python benchmarks/bench_memory.py --configs sinusoid --iterations 200

The few-shot config is ``omniglot-5w1s`` made small (16 filters, meta-batch 4, no
validation): conv + BatchNorm, read from ``--data-dir`` (default ../shared/data/omniglot).
Results go to ``benchmarks/results/DATE-memory.{json,md}``. Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STRATEGIES = ("loop", "vmap", "support")
CONFIGS = {
    "sinusoid": ("sinusoid", {}),
    "omniglot-conv-bn": (
        "omniglot-5w1s",
        {"filters": 16, "meta_batch": 4, "val_every": 0, "eval_tasks": 10},
    ),
}
EVERY = 100


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def worker(config: str, strategy: str, iterations: int, data_dir: str) -> dict:
    import torch

    from metagrad.experiments.config import preset
    from metagrad.experiments.registry import experiment_for
    from metagrad.experiments.runs import Run
    from metagrad.experiments.training import train

    name, overrides = CONFIGS[config]
    cfg = preset(name) | {"preset": name, "iterations": iterations, "vectorize": strategy}
    cfg |= overrides
    if cfg["experiment"] == "omniglot":
        cfg["data_dir"] = data_dir
    if cfg.get("threads", 0) > 0:
        torch.set_num_threads(cfg["threads"])
    exp = experiment_for(cfg)
    samples: dict[int, float] = {}
    step = exp.train_step
    calls = 0

    def recording(maml, batch):
        nonlocal calls
        out = step(maml, batch)
        calls += 1
        if calls % EVERY == 0:
            samples[calls] = round(rss_mib(), 1)
        return out

    exp.train_step = recording  # type: ignore[method-assign]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        train(exp, Run(out), progress=False)
    return {
        "config": config,
        "strategy": strategy,
        "iterations": iterations,
        "seconds": round(time.perf_counter() - start, 1),
        "rss_mib": samples,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--data-dir", default="../shared/data/omniglot")
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--worker", nargs=2, metavar=("CONFIG", "STRATEGY"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.iterations, args.data_dir)))
        return
    rows = []
    for config in args.configs.split(","):
        for strategy in args.strategies.split(","):
            cmd = [sys.executable, __file__, "--worker", config, strategy]
            cmd += ["--iterations", str(args.iterations), "--data-dir", args.data_dir]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append({"config": config, "strategy": strategy, "error": proc.stderr[-500:]})
                print(f"{config} {strategy}: failed\n{proc.stderr[-500:]}", file=sys.stderr)
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    report = {
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "iterations": args.iterations,
        "rows": rows,
    }
    lines = [
        f"# Resident memory over {args.iterations} meta-iterations (VmRSS, MiB)",
        "",
        f"`python benchmarks/bench_memory.py --iterations {args.iterations}`; each row a fresh",
        "process training through `metagrad.experiments.training.train` (metrics, checkpoints).",
        "",
        "| config | strategy | MiB at 100 | MiB at the end | growth after 100 | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['strategy']} | failed | | | |")
            continue
        samples = {int(k): v for k, v in r["rss_mib"].items()}
        first, last = samples[min(samples)], samples[max(samples)]
        lines.append(
            f"| {r['config']} | {r['strategy']} | {first:.1f} | {last:.1f} | "
            f"{last - first:+.1f} | {r['seconds']} |"
        )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{time.strftime('%Y-%m-%d')}-memory"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
