"""Figures for meta-RL runs: return vs gradient steps (MAML paper, Figures 4 and 5) and
the training curve (average return before and after adaptation per meta-iteration)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .plotting import plot_training_curves  # noqa: E402
from .runs import Run  # noqa: E402

if TYPE_CHECKING:
    from .rl import RLExperiment

LABELS = {
    "maml": "MAML",
    "maml-fo": "MAML (first order)",
    "pretrain": "pretrained",
    "oracle": "oracle",
}


def _label(result: dict[str, Any], setting: str) -> str:
    if setting == "random":
        return "random"
    return LABELS.get(result["method"], result["method"])


def return_vs_steps(results: list[dict[str, Any]], path: Path) -> Path:
    """Average return after each number of test-time gradient steps, one line per policy."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for res in results:
        steps = res["steps"]
        for setting, vals in res["results"].items():
            mean, ci = vals["return"], vals["ci95"]
            ax.plot(steps, mean, marker="o", ms=4, label=_label(res, setting))
            lo = [m - c for m, c in zip(mean, ci, strict=True)]
            hi = [m + c for m, c in zip(mean, ci, strict=True)]
            ax.fill_between(steps, lo, hi, alpha=0.2)
    first = results[0]
    ax.set_xticks(first["steps"])
    ax.set_xlabel("number of gradient steps")
    ax.set_ylabel("average return")
    ax.set_title(f"{first.get('preset') or first['env']}: {first['tasks']} test tasks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(exp: RLExperiment, run: Run, baseline: Run | None) -> list[Path]:
    from .evaluation import evaluate_run

    out = []
    results = [evaluate_run(run, exp.device, reuse=True)]
    if baseline is not None:
        results.append(evaluate_run(baseline, exp.device, reuse=True))
    out.append(return_vs_steps(results, run.plots / "return_vs_steps.png"))
    curves = plot_training_curves(
        run, ["return_pre", "return_post"], run.plots / "training_returns.png",
        title=f"{run.config().get('preset', '')} meta-training (average return per path)",
    )  # fmt: skip
    if curves is not None:
        out.append(curves)
    return out
