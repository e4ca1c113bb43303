"""Figures for few-shot classification runs: training curves and accuracy vs test steps."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .plotting import plot_training_curves  # noqa: E402
from .runs import Run  # noqa: E402

if TYPE_CHECKING:
    from .fewshot import FewShotExperiment


def accuracy_vs_steps(result: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    steps = result["steps"]
    for setting, vals in result["results"].items():
        mean = [100 * v for v in vals["accuracy"]]
        ci = [100 * v for v in vals["ci95"]]
        ax.errorbar(steps, mean, yerr=ci, marker="o", ms=3, capsize=3, label=setting)
    ax.set_xlabel("test-time gradient steps")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{result.get('preset') or result['experiment']}: {result['tasks']} test tasks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(exp: FewShotExperiment, run: Run) -> list[Path]:
    from .evaluation import evaluate_run

    out = []
    curves = plot_training_curves(
        run, ["accuracy", "val_accuracy"], run.plots / "training_accuracy.png",
        title=f"{run.config().get('preset', '')} meta-training (query accuracy)",
    )  # fmt: skip
    if curves is not None:
        out.append(curves)
    result = evaluate_run(run, exp.device, reuse=True)
    out.append(accuracy_vs_steps(result, run.plots / "accuracy_vs_steps.png"))
    return out
