"""Time one MAML meta-iteration (meta-loss, backward, Adam step) with metagrad and its peers.

Run: ``python benchmarks/bench_maml.py --config sinusoid|omniglot-5w1s|omniglot-20w1s|mini-5w1s|all
[--iters N] [--rounds R] [--first-order] [--device cpu|cuda] [--threads T] [--libs a,b]``
(``make bench`` runs all configs in ``.bench-venv``, where the peers are installed).

For each config every library gets the same initial weights (one seeded model, deep-copied)
and the same pre-sampled task batches (random images: only the time matters). First each
library's meta-gradient on the first batch is checked against metagrad's in float64; then the
libraries run round-robin, each round in a fresh subprocess per library (``--warmup``
untimed iterations, then ``--iters`` timed ones), so that the peak RSS (VmHWM) of each is
its own. Missing peers are skipped with a note. Results: a markdown table on stdout and in
``benchmarks/results/<date>-<config>[-fo].md`` plus the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import torch.nn.functional as F
from maml_libs import LIBS, Batch, LossFn, Metagrad, missing
from torch import Tensor, nn

from metagrad.models import MLP, miniimagenet_conv4, omniglot_conv4
from metagrad.tasks.sinusoid import SinusoidTasks

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Config:
    kind: str  # sinusoid | omniglot | mini
    ways: int
    shots: int
    queries: int  # per class (sinusoid: points)
    tasks: int  # meta-batch
    steps: int
    lr: float
    iters: int  # defaults sized for `make bench` on 2 cores
    rounds: int
    warmup: int


CONFIGS = {
    "sinusoid": Config("sinusoid", 1, 10, 10, 25, 1, 0.01, iters=20, rounds=3, warmup=3),
    "omniglot-5w1s": Config("omniglot", 5, 1, 15, 32, 1, 0.4, iters=3, rounds=2, warmup=1),
    "omniglot-20w1s": Config("omniglot", 20, 1, 15, 16, 5, 0.1, iters=2, rounds=2, warmup=1),
    "mini-5w1s": Config("mini", 5, 1, 15, 4, 5, 0.01, iters=2, rounds=2, warmup=1),
}
PEERS = ("higher", "torchopt", "learn2learn")
POOL = 3  # distinct pre-sampled batches, cycled


def build(
    cfg: Config, seed: int, dtype: torch.dtype, device: str, batches: int, tasks: int = 0
) -> tuple[nn.Module, LossFn, list[Batch]]:
    """The seeded initial model, the loss and ``batches`` seeded task batches."""
    torch.manual_seed(seed)
    tasks = tasks or cfg.tasks
    g = torch.Generator().manual_seed(seed + 1)
    out: list[Batch] = []
    if cfg.kind == "sinusoid":
        model: nn.Module = MLP(1, [40, 40], 1)
        loss_fn: LossFn = F.mse_loss
        for _ in range(batches):
            out.append(SinusoidTasks().sample(tasks, cfg.shots, cfg.queries, g).tensors())
    else:
        model = omniglot_conv4(cfg.ways) if cfg.kind == "omniglot" else miniimagenet_conv4(cfg.ways)
        loss_fn = F.cross_entropy
        shape = (1, 28, 28) if cfg.kind == "omniglot" else (3, 84, 84)
        labels = torch.arange(cfg.ways)
        sy = labels.repeat_interleave(cfg.shots).expand(tasks, -1).contiguous()
        qy = labels.repeat_interleave(cfg.queries).expand(tasks, -1).contiguous()
        for _ in range(batches):
            sx = torch.rand(tasks, cfg.ways * cfg.shots, *shape, generator=g)
            qx = torch.rand(tasks, cfg.ways * cfg.queries, *shape, generator=g)
            out.append((sx, sy, qx, qy))
    cast = [
        tuple(t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in b)
        for b in out
    ]
    return model.to(device, dtype), loss_fn, cast  # type: ignore[return-value]


# ---------------------------------------------------------------- gradient check
def grad_check(
    cfg: Config, libs: list[str], first_order: bool, seed: int, tasks: int, device: str = "cpu"
) -> tuple[dict[str, str], str]:
    """``{lib: "PASS ..." | "FAIL ..." | "n/a ..."}`` (float64 meta-gradients on ``device``
    against metagrad's) and metagrad's strategy for this config on ``device``."""
    base, loss_fn, (batch,) = build(cfg, seed, torch.float64, device, 1, tasks)
    ref: list[Tensor] = []
    out: dict[str, str] = {}
    strategy = "?"
    for lib in ["metagrad", *(x for x in libs if x != "metagrad")]:
        model = copy.deepcopy(base)
        try:
            step = LIBS[lib][1](model, loss_fn, cfg.lr, cfg.steps, first_order)
            step(batch)
        except NotImplementedError as e:
            out[lib] = f"n/a ({e})"
            continue
        except Exception as e:  # a crashing peer is a failing peer
            out[lib] = f"FAIL ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
            continue
        grads = [p.grad for p in model.parameters()]
        if lib == "metagrad":
            ref = [g if g is not None else torch.zeros(()) for g in grads]
            assert isinstance(step, Metagrad)  # the verdict is cached: no second check
            verdict = step.maml.strategy(batch, steps=cfg.steps, first_order=first_order)
            strategy, out[lib] = f"{verdict.name} ({verdict.reason})", "PASS (reference)"
            continue
        if not ref:
            out[lib] = "n/a (metagrad, the reference, failed)"
            continue
        if any(g is None for g in grads):
            out[lib] = "FAIL (no meta-gradient for some parameters)"
            continue
        scale = max(r.abs().max().item() for r in ref)  # atol relative to the largest gradient
        ok = all(
            torch.allclose(g, r, rtol=1e-6, atol=1e-9 * scale)
            for r, g in zip(ref, grads, strict=True)
        )
        rel = max((g - r).abs().max().item() for r, g in zip(ref, grads, strict=True)) / scale
        out[lib] = f"{'PASS' if ok else 'FAIL'} (max err {rel:.1e} of max grad)"
    return out, strategy


# ---------------------------------------------------------------- worker (one subprocess)
def _status_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, from /proc/self/status.

    Not ``getrusage``'s ``ru_maxrss``: Linux carries it over ``exec`` from the forking
    parent, so a child would report at least the parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(args: argparse.Namespace) -> dict[str, object]:
    from metagrad.core.malloc import keep_freed_memory

    keep_freed_memory()  # the same malloc setting for every library (metagrad sets it anyway)
    cfg = CONFIGS[args.config]
    cuda = args.device == "cuda"
    base, loss_fn, batches = build(cfg, args.seed, torch.float32, args.device, POOL)
    model = copy.deepcopy(base)
    step = LIBS[args.worker][1](model, loss_fn, cfg.lr, cfg.steps, args.first_order)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)  # the same for everyone
    rss0, times, first = _status_mib("VmRSS"), [], float("nan")
    for i in range(args.warmup + args.iters):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        step(batches[i % POOL])
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        if i == 0:
            first = time.perf_counter() - t0  # includes any compile time
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = _status_mib("VmHWM")
    return {
        "times": times,
        "first_s": first,
        "peak_rss_mib": peak,
        "setup_rss_mib": rss0,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }


def run_worker(lib: str, name: str, args: argparse.Namespace, iters: int, warmup: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", lib, "--config", name, "--iters", str(iters)]
    cmd += ["--warmup", str(warmup), "--threads", str(args.threads), "--device", args.device]
    cmd += ["--seed", str(args.seed)] + (["--first-order"] if args.first_order else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- report
def machine() -> dict[str, object]:
    cpu = "?"
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    peers = {pkg: version(pkg) if _installed(pkg) else None for pkg in PEERS}
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "peers": peers,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def report(name: str, args: argparse.Namespace, res: dict) -> str:
    rows, info = res["libs"], res["machine"]
    passing = {
        k: v["median_ms"]
        for k, v in rows.items()
        if "median_ms" in v and v.get("check", "").startswith("PASS")
    }
    best = min(passing.values(), default=float("nan"))
    cfg = CONFIGS[name]
    lines = [
        f"## MAML meta-iteration: {name} ({'first' if args.first_order else 'second'} order)",
        "",
        f"{cfg.tasks} tasks x {cfg.ways}-way {cfg.shots}-shot, {cfg.queries} query, "
        f"{cfg.steps} inner step(s), alpha {cfg.lr}; {res['iters']} timed iters x "
        f"{res['rounds']} rounds (+{res['warmup']} warm-up per round), interleaved; "
        f"device {args.device}, torch.set_num_threads({args.threads}).",
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, "
        f"Python {info['python']}, load avg at start {info['loadavg_at_start']}.",
        f"Command: `{res['command']}`",
        "",
        "| library | idiom | grad check (float64) | median ms | min ms | x fastest | "
        "peak RSS MiB | RSS over setup MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for lib, r in rows.items():
        if "median_ms" not in r:
            lines.append(f"| {lib} | {LIBS[lib][2]} | {r.get('check', '')} | {r['note']} |||||")
            continue
        ratio = f"{r['median_ms'] / best:.2f}" if lib in passing else "-"
        lines.append(
            f"| {lib} | {LIBS[lib][2]} | {r['check']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} "
            f"| {ratio} | {r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - r['setup_rss_mib']:.0f} |"
        )
    ours = ("metagrad", "metagrad-compile")
    peers = {k: v for k, v in passing.items() if k not in (*ours, "autograd")}
    if peers:
        fastest = min(peers, key=peers.__getitem__)
        lines.append("")
        for lib in (x for x in ours if x in passing):
            lines.append(
                f"fastest passing peer's median time ({fastest}) / {lib}'s: "
                f"{peers[fastest] / passing[lib]:.2f}x (above 1: {lib} is faster)."
            )
    if "metagrad-compile" in passing:
        first = rows["metagrad-compile"]["first_iter_s"]
        lines.append(
            "metagrad-compile's first iteration (compile included) per round, s: "
            + ", ".join(f"{t:.1f}" for t in first)
            + " (later rounds reuse inductor's on-disk cache)."
        )
    lines += [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


def bench(name: str, args: argparse.Namespace) -> str:
    cfg = CONFIGS[name]
    # 0: the metagrad preset's setting (one thread for the tiny MLP, every core for convnets)
    args = argparse.Namespace(**{**vars(args), "threads": args.threads or default_threads(cfg)})
    iters, rounds = args.iters or cfg.iters, args.rounds or cfg.rounds
    warmup = cfg.warmup if args.warmup is None else args.warmup
    chosen = args.libs.split(",") if args.libs else list(LIBS)
    notes = [f"{lib}: skipped ({why})" for lib in chosen if (why := missing(lib))]
    libs = [lib for lib in chosen if not missing(lib)]
    if not _installed("learn2learn"):
        notes.append("learn2learn: not benchmarked (not installed: its 0.2.0 sdist does not build)")
    n_check = min(args.check_tasks or cfg.tasks, cfg.tasks)
    check, strategy = grad_check(cfg, libs, args.first_order, args.seed, n_check, args.device)
    notes.append(f"grad check: the first {n_check} task(s) of the first batch, float64")
    notes.append(f"metagrad's default strategy here: {strategy}")
    notes.append(
        "every library runs with glibc's mmap/trim thresholds raised "
        "(metagrad.core.malloc.keep_freed_memory, which MAML.meta_backward applies itself)"
    )
    for lib in libs:
        print(f"[{name}] {lib}: grad check {check[lib]}", flush=True)
    timed = [lib for lib in libs if not check[lib].startswith("n/a")]
    samples: dict[str, list[dict]] = {lib: [] for lib in timed}
    for r in range(rounds if timed else 0):
        for lib in timed[r % len(timed) :] + timed[: r % len(timed)]:  # rotate the order
            out = run_worker(lib, name, args, iters, warmup)
            samples[lib].append(out)
            ms = [1e3 * t for t in out.get("times", [])]
            print(f"[{name}] round {r + 1}/{rounds} {lib}: {out.get('error') or ms}", flush=True)
    rows: dict[str, dict] = {}
    for lib in libs:
        runs = samples.get(lib, [])
        errors = [s["error"] for s in runs if "error" in s]
        times = [t for s in runs for t in s.get("times", [])]
        if lib not in samples or errors or not times:
            rows[lib] = {"check": check[lib], "note": "error: " + errors[0] if errors else "-"}
            continue
        rows[lib] = {
            "check": check[lib],
            "median_ms": 1e3 * statistics.median(times),
            "min_ms": 1e3 * min(times),
            "times_ms": [1e3 * t for t in times],
            "peak_rss_mib": max(s["peak_rss_mib"] for s in runs),
            "setup_rss_mib": max(s["setup_rss_mib"] for s in runs),
            "peak_cuda_mib": runs[0]["peak_cuda_mib"],
            "first_iter_s": [s.get("first_s") for s in runs],
        }
    res = {
        "config": name,
        "settings": asdict(cfg),
        "first_order": args.first_order,
        "device": args.device,
        "threads": args.threads,
        "iters": iters,
        "rounds": rounds,
        "warmup": warmup,
        "command": args.command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "libs": rows,
        "notes": notes,
    }
    text = report(name, args, res)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{res['date'][:10]}-{name}{'-fo' if args.first_order else ''}"
    stem += "" if args.device == "cpu" else f"-{args.device}"
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    return text


def default_threads(cfg: Config) -> int:
    return 1 if cfg.kind == "sinusoid" else os.cpu_count() or 1


def _installed(pkg: str) -> bool:
    try:
        version(pkg)
    except PackageNotFoundError:
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="all", choices=[*CONFIGS, "all"])
    p.add_argument("--iters", type=int, default=0, help="timed iterations per round (0: config's)")
    p.add_argument("--rounds", type=int, default=0, help="interleaved rounds (0: config's)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations per round")
    p.add_argument("--first-order", action="store_true")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--threads", type=int, default=0,
        help="torch.set_num_threads for every library (0: 1 for sinusoid, all cores for convnets)",
    )  # fmt: skip
    p.add_argument("--libs", default="", help=f"comma-separated subset of {','.join(LIBS)}")
    p.add_argument("--check-tasks", type=int, default=4, help="tasks in the grad check (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(filter(None, args.libs.split(","))) - set(LIBS)
    if unknown:
        p.error(f"unknown --libs {sorted(unknown)}; choose from {list(LIBS)}")
    args.command = " ".join(["python benchmarks/bench_maml.py", *(argv or sys.argv[1:])])
    if args.worker:
        torch.set_num_threads(args.threads)
        torch.set_num_interop_threads(args.threads)
        print(json.dumps(worker(args)))
        return
    for name in CONFIGS if args.config == "all" else [args.config]:
        print(bench(name, args), flush=True)


if __name__ == "__main__":
    main()
