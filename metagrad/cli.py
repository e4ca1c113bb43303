"""The ``metagrad`` command line: train, eval, plot, presets."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import torch

from .errors import ConfigError, MetagradError

# keys that may change when a run is resumed (they do not change what was trained so far)
RESUMABLE = {
    "iterations", "log_every", "checkpoint_every", "val_every", "time_limit_min", "data_dir",
    "threads", "on_nonfinite", "tensorboard",
}  # fmt: skip


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"bad --device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for CUDA, but no CUDA device is available")
    return dev


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=None, help="random seed (default: the preset's)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:N")


def build_parser() -> argparse.ArgumentParser:
    """The `metagrad` argument parser (the docs render its help)."""
    ap = argparse.ArgumentParser(
        prog="metagrad", description="Gradient-based meta-learning (MAML) experiments."
    )
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a preset into a run directory (resumes if it exists)")
    t.add_argument("preset", help="preset name (see `metagrad presets`)")
    t.add_argument("--out", help="run directory (default: runs/PRESET-METHOD-TIMESTAMP)")
    t.add_argument("--config", help="TOML file of config values")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config value")
    t.add_argument("--data-dir", help="dataset folder (sets data_dir; Omniglot: the two zips)")
    t.add_argument("--no-eval", action="store_true", help="skip evaluation and plots at the end")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument(
        "--nproc", type=int, default=1, metavar="N",
        help="data-parallel training on N local processes (CPU: gloo; GPUs: NCCL, one each)",
    )  # fmt: skip
    t.add_argument(
        "--dist-timeout", type=float, default=None, metavar="SECONDS",
        help="multi-process runs: how long to wait for the other processes at the rendezvous "
        "and at each gradient all-reduce before giving up (default: 600)",
    )  # fmt: skip
    _common(t)
    e = sub.add_parser("eval", help="evaluate run directories; several print a comparison")
    e.add_argument("runs", nargs="+", help="run directories")
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    e.add_argument(
        "--over-seeds", action="store_true",
        help="the runs are one configuration trained with different seeds: print the mean "
        "over them with a 95%% CI over seeds (Student's t)",
    )  # fmt: skip
    e.add_argument(
        "--checkpoint", choices=["best", "last"], default="best",
        help="best: the best validated parameters when the run has them (eval.json); "
        "last: the parameters training ended with (eval-last.json)",
    )  # fmt: skip
    _common(e)
    pl = sub.add_parser("plot", help="write the figures of a run into DIR/plots")
    pl.add_argument("run", help="run directory")
    pl.add_argument("--baseline", help="a baseline run directory to draw beside it")
    _common(pl)
    pr = sub.add_parser("presets", help="list the presets, or one preset's config keys")
    pr.add_argument("name", nargs="?", help="a preset: print its keys, values and meanings")
    _common(pr)
    return ap


def resolve_config(args: argparse.Namespace) -> dict:
    from .experiments import config as C
    from .experiments.options import with_algorithm_defaults

    cfg = C.preset(args.preset)
    cfg["preset"] = args.preset
    from_file = C.load_toml(args.config) if args.config else {}
    if args.config:
        cfg = C.apply_mapping(cfg, from_file, args.config)
    cfg = C.apply_overrides(cfg, args.set)
    if getattr(args, "data_dir", None):
        cfg = C.apply_overrides(cfg, [f"data_dir={args.data_dir}"])
    if args.seed is not None:
        cfg["seed"] = args.seed
    return with_algorithm_defaults(cfg, _set_keys(args) | set(from_file))


def _set_keys(args: argparse.Namespace) -> set[str]:
    """The keys given with ``--set``."""
    return {s.split("=", 1)[0].strip() for s in args.set if "=" in s}


def _requested(args: argparse.Namespace) -> dict:
    """The values the user asked for explicitly (to compare with a run being resumed)."""
    from .experiments import config as C

    full = resolve_config(args)
    base = C.preset(args.preset)
    asked = {k for k in full if k not in base or full[k] != base[k]}
    asked |= _set_keys(args)
    if args.config:
        asked |= set(C.load_toml(args.config))
    if args.data_dir:
        asked.add("data_dir")
    if args.seed is not None:
        asked.add("seed")
    return {k: full[k] for k in asked if k in full}


def _prepare_run(args: argparse.Namespace, out: str | None = None) -> tuple[dict, str, bool]:
    """The config to train with, the run directory and whether it resumes; checks the
    directory against the request but writes nothing."""
    from .experiments.runs import LOCK, Run

    cfg = resolve_config(args)
    out = (
        out
        or args.out
        or f"runs/{args.preset}-{cfg.get('method', 'maml')}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    run = Run(out)
    resuming = False
    if run.has_config():
        from .experiments.config import preset

        # keys added to the preset since the run was made take their defaults
        saved = preset(args.preset) | run.config()
        for key, value in _requested(args).items():
            if key == "preset" and saved.get("preset") != value:
                raise ConfigError(
                    f"{out} holds a run of preset {saved.get('preset')!r}, not {value!r}"
                )
            if key not in RESUMABLE and saved.get(key) != value:
                raise ConfigError(
                    f"{out} was trained with {key}={saved.get(key)!r}, not {value!r}; "
                    "use a new --out (only iterations and logging may change on resume)"
                )
            saved[key] = value
        cfg = saved
        resuming = run.has_checkpoint()
    elif run.path.is_file():
        raise ConfigError(f"{out} is a file, not a run directory; choose another --out")
    elif run.path.is_dir() and any(p.name != LOCK for p in run.path.iterdir()):
        raise ConfigError(f"{out} exists and is not a run directory; choose another --out")
    return cfg, out, resuming


def _launch(args: argparse.Namespace) -> int:
    """``--nproc N``: check the request here, once, then start N ranks of this command."""
    from .experiments import distributed as D
    from .experiments.registry import experiment_for
    from .experiments.runs import Run

    device = _device(args.device)
    if device.type == "cuda" and args.nproc > torch.cuda.device_count():
        raise ConfigError(
            f"--nproc {args.nproc} needs {args.nproc} GPUs (one per process), but "
            f"{torch.cuda.device_count()} are visible; use fewer or --device cpu"
        )
    cfg, out, _ = _prepare_run(args)
    # a bad value or a busy run directory fails here, before any process starts
    D.check_parallel(experiment_for(cfg, torch.device("cpu")), args.nproc)
    Run(out).lock().release()  # rank 0 takes the lock for the run itself
    command = [sys.executable, "-m", "metagrad", *args.argv, "--out", out]
    hint = f"run the same command again to resume from the last checkpoint in {out}"
    return D.launch(command, args.nproc, hint=hint)


def cmd_train(args: argparse.Namespace) -> int:
    from .experiments import distributed as D

    if args.nproc < 1:
        raise ConfigError(f"bad value {args.nproc} for --nproc: must be >= 1")
    env = D.world_from_env()
    if env is None and args.nproc > 1:
        return _launch(args)
    if env is not None and args.nproc not in (1, env.world_size):
        raise ConfigError(
            f"--nproc {args.nproc} conflicts with WORLD_SIZE={env.world_size} in the "
            "environment (started by torchrun?); drop --nproc"
        )
    timeout = D.DEFAULT_TIMEOUT_S if args.dist_timeout is None else args.dist_timeout
    device = D.world_device(env, _device(args.device))
    world = D.init_world(env, device, timeout)
    try:
        return _train(args, device, world)
    finally:
        world.close()


def _train(args: argparse.Namespace, device: torch.device, world) -> int:
    from .experiments import distributed as D
    from .experiments.registry import experiment_for
    from .experiments.runs import Run, RunLock

    held: list[RunLock] = []

    def setup() -> tuple[dict, str, bool]:  # rank 0 checks, locks and writes the run directory
        cfg, out, _ = _prepare_run(args)
        exp = experiment_for(cfg, device)
        D.check_parallel(exp, world.size)
        exp.build()  # a value the learner refuses fails here, before anything is written
        held.append(Run(out).lock())  # one writer: a second `train` stops here
        cfg, out, resuming = _prepare_run(args, out)  # again, now that no one else writes
        Run(out).write_config(cfg)
        return cfg, out, resuming

    try:
        cfg, out, resuming = world.on_main(setup, "the start-up")
        return _train_locked(args, device, world, cfg, out, resuming)
    finally:
        for lock in held:
            lock.release()


def _what(cfg: dict) -> str:
    """What a run trains, for the start-up line: the algorithm, or a baseline's method."""
    from .experiments.options import algorithm_label

    method = cfg.get("method", "maml")
    return algorithm_label(cfg) if method == "maml" and "algorithm" in cfg else method


def _train_locked(args: argparse.Namespace, device: torch.device, world, cfg: dict, out: str,
                  resuming: bool) -> int:  # fmt: skip
    from .experiments.evaluation import evaluate_run, format_table
    from .experiments.registry import experiment_for
    from .experiments.runs import Run
    from .experiments.training import train

    run = Run(out)
    if cfg.get("threads", 0) > 0:
        torch.set_num_threads(cfg["threads"])
    exp = experiment_for(cfg, device)
    if world.is_main:
        if resuming:
            print(f"resuming {out}", file=sys.stderr)
        ranks = f" x {world.size} processes" if world.size > 1 else ""
        print(
            f"training {args.preset} ({_what(cfg)}) into {out} on {device}{ranks}",
            file=sys.stderr,
        )
    train(exp, run, progress=not args.quiet, world=world)
    if not world.is_main:
        return 0
    if not args.no_eval:
        result = evaluate_run(run, device)
        exp.plot(run)
        print(format_table([result]))
    print(f"run directory: {out}", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .experiments.evaluation import evaluate_run, format_table, over_seeds
    from .experiments.runs import Run

    device = _device(args.device)
    results = [evaluate_run(Run(r), device, checkpoint=args.checkpoint) for r in args.runs]
    if args.over_seeds:
        results = [over_seeds(results)]
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else {"runs": results}))
    else:
        print(format_table(results))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .experiments.registry import experiment_for
    from .experiments.runs import Run

    run = Run(args.run)
    cfg = run.config()
    if cfg.get("threads", 0) > 0:
        torch.set_num_threads(cfg["threads"])
    exp = experiment_for(cfg, _device(args.device))
    baseline = Run(args.baseline) if args.baseline else None
    if baseline is not None:
        baseline.config()  # fail early, with a clear message
    for path in exp.plot(run, baseline):
        print(path)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from .experiments.config import preset, presets
    from .experiments.keys import describe, format_value

    if args.name:
        cfg = preset(args.name)
        print(f"{args.name}: {presets()[args.name]}")
        width = max(map(len, cfg))
        for key, value in cfg.items():
            print(f"  {key:<{width}} = {format_value(value):<12}  {describe(key)}")
        return 0
    items = presets()
    width = max(map(len, items))
    for name, desc in items.items():
        print(f"{name:<{width}}  {desc}")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "plot": cmd_plot, "presets": cmd_presets}


def _report(e: MetagradError) -> None:
    """Print ``e`` as one line; the other ranks of a multi-process run leave to rank 0
    what it reports for all of them."""
    from .experiments.distributed import PeerFailed, current_rank
    from .experiments.training import Diverged

    rank = current_rank()
    if rank == 0:
        print(f"metagrad: error: {e}", file=sys.stderr)
    elif not isinstance(e, PeerFailed | Diverged):  # every rank has them
        print(f"metagrad: error: rank {rank}: {e}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``metagrad`` command; returns its exit status. A rank of a multi-process run
    exits here instead (:func:`metagrad.experiments.distributed.exit_rank`)."""
    from .experiments import distributed as D

    code = _main(argv)
    if D.joined_group():
        D.exit_rank(code)
    return code


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.seed is not None:
        torch.manual_seed(args.seed)
    try:
        _device(args.device)  # every command checks it, so a typo never passes silently
        return COMMANDS[args.command](args)
    except MetagradError as e:
        from .experiments.distributed import current_rank
        from .experiments.training import Interrupted

        if isinstance(e, Interrupted):  # a requested stop, checkpointed: not an error
            if current_rank() == 0:
                print(f"metagrad: {e}", file=sys.stderr)
            return e.exit_status
        _report(e)
        return 2
    except KeyboardInterrupt:
        print("metagrad: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
