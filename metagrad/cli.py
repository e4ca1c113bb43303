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
    "threads",
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


def _parser() -> argparse.ArgumentParser:
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
    _common(t)
    e = sub.add_parser("eval", help="evaluate run directories; several print a comparison")
    e.add_argument("runs", nargs="+", help="run directories")
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    _common(e)
    pl = sub.add_parser("plot", help="write the figures of a run into DIR/plots")
    pl.add_argument("run", help="run directory")
    pl.add_argument("--baseline", help="a baseline run directory to draw beside it")
    _common(pl)
    pr = sub.add_parser("presets", help="list the presets")
    _common(pr)
    return ap


def resolve_config(args: argparse.Namespace) -> dict:
    from .experiments import config as C

    cfg = C.preset(args.preset)
    cfg["preset"] = args.preset
    if args.config:
        cfg = C.apply_mapping(cfg, C.load_toml(args.config), args.config)
    cfg = C.apply_overrides(cfg, args.set)
    if getattr(args, "data_dir", None):
        cfg = C.apply_overrides(cfg, [f"data_dir={args.data_dir}"])
    if args.seed is not None:
        cfg["seed"] = args.seed
    return cfg


def _requested(args: argparse.Namespace) -> dict:
    """The values the user asked for explicitly (to compare with a run being resumed)."""
    from .experiments import config as C

    full = resolve_config(args)
    base = C.preset(args.preset)
    asked = {k for k in full if k not in base or full[k] != base[k]}
    asked |= {s.split("=", 1)[0].strip() for s in args.set if "=" in s}
    if args.config:
        asked |= set(C.load_toml(args.config))
    if args.data_dir:
        asked.add("data_dir")
    if args.seed is not None:
        asked.add("seed")
    return {k: full[k] for k in asked if k in full}


def cmd_train(args: argparse.Namespace) -> int:
    from .experiments.evaluation import evaluate_run, format_table
    from .experiments.registry import experiment_for
    from .experiments.runs import Run
    from .experiments.training import train

    cfg = resolve_config(args)
    device = _device(args.device)
    out = (
        args.out
        or f"runs/{args.preset}-{cfg.get('method', 'maml')}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    run = Run(out)
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
        if run.has_checkpoint():
            print(f"resuming {out}", file=sys.stderr)
    elif run.path.exists() and any(run.path.iterdir()):
        raise ConfigError(f"{out} exists and is not a run directory; choose another --out")
    if cfg.get("threads", 0) > 0:
        torch.set_num_threads(cfg["threads"])
    exp = experiment_for(cfg, device)
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_config(cfg)
    print(
        f"training {args.preset} ({cfg.get('method', 'maml')}) into {out} on {device}",
        file=sys.stderr,
    )
    train(exp, run, progress=not args.quiet)
    if not args.no_eval:
        result = evaluate_run(run, device)
        exp.plot(run)
        print(format_table([result]))
    print(f"run directory: {out}", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .experiments.evaluation import evaluate_run, format_table
    from .experiments.runs import Run

    device = _device(args.device)
    results = [evaluate_run(Run(r), device) for r in args.runs]
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else {"runs": results}))
    else:
        print(format_table(results))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .experiments.registry import experiment_for
    from .experiments.runs import Run

    run = Run(args.run)
    exp = experiment_for(run.config(), _device(args.device))
    baseline = Run(args.baseline) if args.baseline else None
    if baseline is not None:
        baseline.config()  # fail early, with a clear message
    for path in exp.plot(run, baseline):
        print(path)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from .experiments.config import presets

    items = presets()
    width = max(map(len, items))
    for name, desc in items.items():
        print(f"{name:<{width}}  {desc}")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "plot": cmd_plot, "presets": cmd_presets}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    try:
        _device(args.device)  # every command checks it, so a typo never passes silently
        return COMMANDS[args.command](args)
    except MetagradError as e:
        print(f"metagrad: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metagrad: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
