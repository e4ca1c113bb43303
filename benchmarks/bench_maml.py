"""Time one MAML meta-iteration (meta-loss, backward, Adam step) with metagrad and its peers.

Run: ``python benchmarks/bench_maml.py --config sinusoid|omniglot-5w1s|omniglot-20w1s|mini-5w1s|all
[--algorithm maml|metasgd|anil|maml-adam|imaml] [--iters N] [--rounds R] [--first-order]
[--device cpu|cuda] [--threads T] [--libs a,b]`` (``make bench`` runs all configs in
``.bench-venv``, where the peers are installed).

``--algorithm`` (default ``maml``) picks the family member, each written with every library
that can express it (``maml_libs.LIBS_BY_ALGORITHM``): ``metasgd`` (learned per-parameter
inner rates: the check covers the meta-gradient of the weights and of the rates), ``anil``
(only the head adapts) and ``maml-adam`` (inner Adam; a peer that fails the check is compared
with known variants of the Adam formula, ``maml_libs.VARIANTS``, and the report names the one
it matches) and ``imaml`` (implicit MAML: TorchOpt's implicit differentiation,
``torchopt.diff.implicit.custom_root`` with its CG solver, against metagrad's ``iMAML``; the
iMAML authors' lam 2 and 5 CG steps; on the Omniglot configs their 16 inner steps at 0.1,
because the configs' single MAML step at 0.4 leaves the proximal problem far from solved,
which the implicit gradient assumes, elsewhere the config's steps and rate; no first order).
The outer optimizer updates the learned rates too.

For each config every library gets the same initial weights (one seeded model, deep-copied)
and the same pre-sampled task batches (random images: only the time matters). First each
library's meta-gradient on the first batch is checked against metagrad's in float64; then the
libraries run round-robin, each round in a fresh subprocess per library (``--warmup``
untimed iterations, then ``--iters`` timed ones), so that the peak RSS (VmHWM) of each is
its own. Missing peers are skipped with a note. Results: a markdown table on stdout and in
``benchmarks/results/<date>-<config>[-<algorithm>][-fo].md`` (no algorithm for MAML) plus the
raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
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
from maml_libs import (
    ALGORITHMS,
    B1,
    B2,
    CG_STEPS,
    CG_TOL,
    EPS,
    LAM,
    LIBS_BY_ALGORITHM,
    VARIANT_LEGEND,
    VARIANTS,
    Batch,
    LossFn,
    Metagrad,
    head_name,
    meta_parameters,
    missing,
)
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
# inner Adam's step size at most: its steps are ~lr per entry whatever the gradient, so the
# configs' SGD rates (0.4 for Omniglot) would throw the weights far off
ADAM_LR = 0.01


# iMAML on Omniglot: the authors' inner loop (16 steps at 0.1), metagrad's iMAML defaults
IMAML_OMNIGLOT_LR, IMAML_OMNIGLOT_STEPS = 0.1, 16


def inner_lr(cfg: Config, algorithm: str) -> float:
    """The inner step size (Meta-SGD: the learned rates' start value)."""
    if algorithm == "imaml" and cfg.kind == "omniglot":
        return IMAML_OMNIGLOT_LR
    return min(cfg.lr, ADAM_LR) if algorithm == "maml-adam" else cfg.lr


def inner_steps(cfg: Config, algorithm: str) -> int:
    """The number of inner steps."""
    return IMAML_OMNIGLOT_STEPS if algorithm == "imaml" and cfg.kind == "omniglot" else cfg.steps


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
Grads = tuple[list[Tensor], list[Tensor]]  # (the model's parameters', the learned rates')


def _meta_grads(
    factory: object, base: nn.Module, loss_fn: LossFn, lr: float, steps: int, first_order: bool,
    batch: Batch,
) -> tuple[object, Grads | str]:  # fmt: skip
    """Run one library's step on a copy of ``base``: ``(step, grads)``, or ``(step, why)``
    when some meta-gradient is missing."""
    model = copy.deepcopy(base)
    step = factory(model, loss_fn, lr, steps, first_order)  # type: ignore[operator]
    step(batch)
    rates = list(getattr(step, "rates", []))
    weights = [p.grad for p in model.parameters()]
    if any(g is None for g in weights):
        return step, "no meta-gradient for some parameters"
    if any(r.grad is None for r in rates):
        return step, "no meta-gradient for some learned rates"
    return step, (
        [g for g in weights if g is not None],
        [r.grad for r in rates if r.grad is not None],
    )


def compare(ref: Grads, got: Grads) -> tuple[bool, str]:
    """Whether ``got`` matches ``ref`` (rtol 1e-6, atol 1e-9 of the group's largest entry,
    per group: weights, rates), and the max errors as text. NaN and inf never match."""
    if [len(x) for x in got] != [len(x) for x in ref] or any(
        g.shape != r.shape for gs, rs in zip(got, ref, strict=True) for g, r in zip(gs, rs, strict=True)
    ):  # fmt: skip
        return False, "different parameter or rate shapes"
    ok, parts = True, []
    for what, rs, gs in zip(("weights", "rates"), ref, got, strict=True):
        if not rs:
            continue
        scale = max(r.abs().max().item() for r in rs) or 1.0  # atol relative to the largest
        bad = sum(int((~torch.isfinite(g)).sum()) for g in gs)
        total = sum(g.numel() for g in gs)
        ok &= bad == 0 and all(
            torch.allclose(g, r, rtol=1e-6, atol=1e-9 * scale) for r, g in zip(rs, gs, strict=True)
        )
        finite = [((g - r).abs()[torch.isfinite(g)]) for r, g in zip(rs, gs, strict=True)]
        err = max((f.max().item() for f in finite if f.numel()), default=0.0) / scale
        text = f"max err {err:.1e} of max grad"
        if bad == total:
            text = f"NaN/inf in all {total} entries"
        elif bad:
            text = f"NaN/inf in {bad} of {total} entries, {text.replace('err', 'err elsewhere')}"
        parts.append(f"{what}: {text}" if ref[1] else text)
    return ok, "; ".join(parts)


def grad_check(
    cfg: Config, libs: list[str], first_order: bool, seed: int, tasks: int, device: str = "cpu",
    algorithm: str = "maml",
) -> tuple[dict[str, str], str]:  # fmt: skip
    """``{lib: "PASS ..." | "FAIL ..." | "n/a ..."}`` (float64 meta-gradients on ``device``
    against metagrad's, the learned rates' included) and metagrad's strategy for this config
    on ``device``. A failing peer is compared with the algorithm's known variants too."""
    base, loss_fn, (batch,) = build(cfg, seed, torch.float64, device, 1, tasks)
    entries, lr = LIBS_BY_ALGORITHM[algorithm], inner_lr(cfg, algorithm)
    steps = inner_steps(cfg, algorithm)
    ref: Grads | None = None
    variants: dict[str, Grads | str] = {}
    out: dict[str, str] = {}
    strategy = "?"
    for lib in ["metagrad", *(x for x in libs if x != "metagrad")]:
        try:
            step, grads = _meta_grads(entries[lib][1], base, loss_fn, lr, steps, first_order, batch)
        except NotImplementedError as e:
            out[lib] = f"n/a ({e})"
            continue
        except Exception as e:  # a crashing peer is a failing peer
            out[lib] = f"FAIL ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
            continue
        if lib == "metagrad":
            assert isinstance(step, Metagrad)  # the verdict is cached: no second check
            if algorithm == "imaml":  # vmap (float64-checked) or the per-task loop
                vmapped = step.maml.batched(batch)
                strategy = "vmap (checked in float64)" if vmapped else "per-task loop"
            else:
                verdict = step.maml.strategy(batch, steps=steps, first_order=first_order)
                strategy = f"{verdict.name} ({verdict.reason})"
            if isinstance(grads, str):
                out[lib] = f"FAIL ({grads})"
                continue
            ref = grads
            out[lib] = "PASS (reference)"
            continue
        if ref is None:
            out[lib] = "n/a (metagrad, the reference, failed)"
            continue
        if isinstance(grads, str):
            out[lib] = f"FAIL ({grads})"
            continue
        ok, text = compare(ref, grads)
        if not ok and algorithm in VARIANTS:
            text += "; " + _which_variant(variants, algorithm, grads, base, loss_fn, lr, steps,
                                          first_order, batch)  # fmt: skip
        out[lib] = f"{'PASS' if ok else 'FAIL'} ({text})"
    return out, strategy


def _which_variant(
    cache: dict[str, Grads | str], algorithm: str, grads: Grads, base: nn.Module, loss_fn: LossFn,
    lr: float, steps: int, first_order: bool, batch: Batch,
) -> str:  # fmt: skip
    """Which known variants of the algorithm's formula ``grads`` match (NaN where NaN; all
    of them: where NaN hides the other entries, more than one may)."""
    found = []
    for name, factory in VARIANTS[algorithm].items():
        if name not in cache:
            cache[name] = _meta_grads(factory, base, loss_fn, lr, steps, first_order, batch)[1]
        want = cache[name]
        if isinstance(want, str):
            continue
        same_nan = all(
            torch.equal(torch.isnan(g), torch.isnan(w))
            for gs, ws in zip(grads, want, strict=True)
            for g, w in zip(gs, ws, strict=True)
        )
        if same_nan and compare(_nan_to_zero(want), _nan_to_zero(grads))[0]:
            found.append(name)
    fewest = min((n.count("+") for n in found), default=0)
    simplest = [n for n in found if n.count("+") == fewest]
    if simplest:
        text = "matches the reference with " + " or ".join(simplest)
        if len(found) > len(simplest):  # e.g. NaN hides the rest, or first order hides sqrt's
            text += " (so do combinations with further differences: this check cannot tell)"
        return text
    singles = [n for n in VARIANTS[algorithm] if "+" not in n]
    return "matches none of the known variants (" + ", ".join(singles) + ")"


def _nan_to_zero(grads: Grads) -> Grads:
    return ([g.nan_to_num(0.0) for g in grads[0]], [g.nan_to_num(0.0) for g in grads[1]])


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
    factory = LIBS_BY_ALGORITHM[args.algorithm][args.worker][1]
    lr, steps = inner_lr(cfg, args.algorithm), inner_steps(cfg, args.algorithm)
    step = factory(model, loss_fn, lr, steps, args.first_order)
    # the same for everyone; Meta-SGD's learned rates are meta-parameters too
    opt = torch.optim.Adam(meta_parameters(model, step), lr=1e-3, fused=True)
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
    cmd += ["--seed", str(args.seed), "--algorithm", args.algorithm]
    cmd += ["--first-order"] if args.first_order else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- report
def write_report(lines: list[str], out_dir: str | Path, name: str) -> str:
    """Join a markdown report, write it to ``out_dir/<UTC date>-<name>.md`` and print it."""
    text = "\n".join(lines)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    (out / f"{day}-{name}.md").write_text(text + "\n")
    print(text)
    return text


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
    cfg, libs = CONFIGS[name], LIBS_BY_ALGORITHM[args.algorithm]
    lines = [
        f"## {ALGORITHMS[args.algorithm]} meta-iteration: {name} "
        f"({'first' if args.first_order else 'second'} order)",
        "",
        f"{cfg.tasks} tasks x {cfg.ways}-way {cfg.shots}-shot, {cfg.queries} query, "
        f"{inner_steps(cfg, args.algorithm)} inner step(s), alpha {inner_lr(cfg, args.algorithm)}; "
        f"{res['iters']} timed iters x "
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
            lines.append(
                f"| {lib} | {libs[lib][2]} | {_cell(r.get('check', ''))} | {r['note']} |||||"
            )
            continue
        ratio = f"{r['median_ms'] / best:.2f}" if lib in passing else "-"
        lines.append(
            f"| {lib} | {libs[lib][2]} | {_cell(r['check'])} | {r['median_ms']:.1f} | {r['min_ms']:.1f} "
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


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def bench(name: str, args: argparse.Namespace) -> str:
    cfg = CONFIGS[name]
    # 0: the metagrad preset's setting (one thread for the tiny MLP, every core for convnets)
    args = argparse.Namespace(**{**vars(args), "threads": args.threads or default_threads(cfg)})
    iters, rounds = args.iters or cfg.iters, args.rounds or cfg.rounds
    warmup = cfg.warmup if args.warmup is None else args.warmup
    algo = args.algorithm
    chosen = args.libs.split(",") if args.libs else list(LIBS_BY_ALGORITHM[algo])
    notes = [f"{lib}: skipped ({why})" for lib in chosen if (why := missing(lib, algo))]
    libs = [lib for lib in chosen if not missing(lib, algo)]
    if not _installed("learn2learn"):
        notes.append("learn2learn: not benchmarked (not installed: its 0.2.0 sdist does not build)")
    n_check = min(args.check_tasks or cfg.tasks, cfg.tasks)
    check, strategy = grad_check(cfg, libs, args.first_order, args.seed, n_check, args.device, algo)
    notes.append(
        f"grad check: the first {n_check} task(s) of the first batch, float64"
        + (" (meta-gradients of the weights and of the learned rates)" if algo == "metasgd" else "")
    )
    notes += algorithm_notes(cfg, algo)
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
        "algorithm": algo,
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
    stem = f"{res['date'][:10]}-{name}{'' if algo == 'maml' else '-' + algo}"
    stem += "-fo" if args.first_order else ""
    stem += "" if args.device == "cpu" else f"-{args.device}"
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    return text


def algorithm_notes(cfg: Config, algorithm: str) -> list[str]:
    lr = inner_lr(cfg, algorithm)
    if algorithm == "metasgd":
        return [
            f"Meta-SGD: a learned rate tensor per parameter tensor, starting at {lr}; "
            "the outer Adam updates them with the weights"
        ]
    if algorithm == "anil":
        head = head_name(build(cfg, 0, torch.float64, "cpu", 0, 1)[0])
        return [
            f"ANIL: only `{head}` adapts; metagrad and the autograd reference run the whole "
            "model at every inner step, the peers compute the body's features once per task "
            "and adapt the head on them (their usual ANIL idiom)"
        ]
    if algorithm == "maml-adam":
        return [
            f"inner Adam: lr {lr} (the config's alpha capped at {ADAM_LR}), betas {B1, B2}, "
            f"eps {EPS}, moments zero per task; TorchOpt's adam/MetaAdam with their defaults "
            "(eps_root=0)",
            "a peer that fails the check is compared with the reference computed with known "
            "differences of the Adam formula: "
            + "; ".join(f"{k}: {v}" for k, v in VARIANT_LEGEND[algorithm].items()),
        ]
    if algorithm == "imaml":
        steps = inner_steps(cfg, algorithm)
        where = "the authors' Omniglot setting" if cfg.kind == "omniglot" else "the config's"
        return [
            f"iMAML: {steps} gradient step(s) at {lr} ({where}) on L_support + lam/2 "
            f"|phi - theta|^2 from theta, lam {LAM}; meta-gradient mean_t lam (H_t + lam I)^-1 "
            f"grad L_query(phi_t) by {CG_STEPS} CG iterations from 0 (early stop r.r < "
            f"{CG_TOL:g} on that system)",
            "TorchOpt: custom_root solves (H + lam I)^T u = -grad L_query and returns -lam u, "
            f"so its CG runs with rtol=0, atol={math.sqrt(CG_TOL) / LAM:g} (the same early stop; "
            "its default is relative, |r| <= 1e-5 |b|); its CG also computes A(x0) once "
            "(x0 = 0) before iterating",
        ]
    return []


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
    p.add_argument(
        "--algorithm", default="maml", choices=list(ALGORITHMS),
        help="maml (default), metasgd (learned per-parameter rates), anil (head only), "
        "maml-adam (inner Adam), imaml (implicit MAML; second order only)",
    )  # fmt: skip
    p.add_argument("--iters", type=int, default=0, help="timed iterations per round (0: config's)")
    p.add_argument("--rounds", type=int, default=0, help="interleaved rounds (0: config's)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations per round")
    p.add_argument("--first-order", action="store_true")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--threads", type=int, default=0,
        help="torch.set_num_threads for every library (0: 1 for sinusoid, all cores for convnets)",
    )  # fmt: skip
    p.add_argument(
        "--libs", default="",
        help="comma-separated subset of the algorithm's libraries: "
        + "; ".join(f"{a}: {','.join(v)}" for a, v in LIBS_BY_ALGORITHM.items()),
    )  # fmt: skip
    p.add_argument("--check-tasks", type=int, default=4, help="tasks in the grad check (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.algorithm == "imaml" and args.first_order:
        p.error("--algorithm imaml has no first-order variant (its meta-gradient is implicit)")
    known = LIBS_BY_ALGORITHM[args.algorithm]
    unknown = set(filter(None, args.libs.split(","))) - set(known)
    if unknown:
        p.error(f"unknown --libs {sorted(unknown)} for --algorithm {args.algorithm}; "
                f"choose from {list(known)}")  # fmt: skip
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
