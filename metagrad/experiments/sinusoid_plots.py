"""Figures 2 and 3 of the MAML paper for a sinusoid run (and an optional baseline run)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .plotting import plot_training_curves  # noqa: E402
from .runs import EVAL, Run  # noqa: E402

if TYPE_CHECKING:
    from .sinusoid import SinusoidExperiment

LABELS = {"maml": "MAML", "pretrain": "pretrained", "oracle": "oracle"}


def _runs(exp: SinusoidExperiment, run: Run, baseline: Run | None):
    from .registry import experiment_for

    out = [(exp, run)]
    if baseline is not None:
        out.append((experiment_for(baseline.config(), exp.device), baseline))
    return out


def figure2(exp: SinusoidExperiment, run: Run, baseline: Run | None, path: Path) -> Path:
    """One test task: ground truth, the K points, and the fit before and after 1 and 10 steps."""
    pairs = _runs(exp, run, baseline)
    shots_list = [5, 10]
    fig, axes = plt.subplots(
        len(pairs), len(shots_list), figsize=(5 * len(shots_list), 3.6 * len(pairs)), squeeze=False
    )
    g = torch.Generator().manual_seed(exp.cfg["eval_seed"] + 7)
    task = exp.tasks.sample(1, max(shots_list), 0, g)
    xs = torch.linspace(-5, 5, 200).view(1, -1, 1)
    truth = exp.tasks.function(xs, task.amplitude, task.phase)
    for row, (e, r) in enumerate(pairs):
        maml = e.load_trained(r, torch.device("cpu"))
        for col, k in enumerate(shots_list):
            ax = axes[row, col]
            sx, sy = task.support_x[0, :k], task.support_y[0, :k]
            # the network's inputs (the oracle's also hold the task's amplitude and phase)
            sx_in = e.inputs(task.support_x, task.amplitude, task.phase)[0, :k]
            xs_in = e.inputs(xs, task.amplitude, task.phase)[0]
            ax.plot(xs[0, :, 0], truth[0, :, 0], color="red", lw=2, label="ground truth")
            ax.scatter(
                sx[:, 0], sy[:, 0], marker="^", color="purple", zorder=5, label=f"{k} points"
            )
            for steps, style in [(0, ":"), (1, "--"), (10, "-")]:
                with torch.no_grad():
                    pred = maml.adapt(sx_in, sy, steps=steps)(xs_in)
                label = "pre-update" if steps == 0 else f"{steps} grad step" + "s" * (steps > 1)
                ax.plot(xs[0, :, 0], pred[:, 0], style, color="green", label=label)
            method = LABELS.get(e.cfg["method"], e.cfg["method"])
            ax.set_title(f"{method}, K={k}")
            ax.set_ylim(-6, 6)
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figure3(results: list[dict], path: Path) -> Path:
    """MSE on test tasks after each number of gradient steps, for K = 5, 10, 20."""
    keys = list(results[0]["results"])
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        top = 1.15 * max(res["results"][key]["mse"][0] for res in results)
        for res in results:
            steps = res["steps"]
            vals = res["results"][key]
            diverged = vals.get("diverged", [0] * len(steps))
            label = LABELS.get(res["method"], res["method"])
            if any(diverged) and "mse_converged" in vals:  # the plain mean is inf somewhere
                x, mean, ci = steps, vals["mse_converged"], vals["ci95_converged"]
                label += f" ({vals['converged_tasks']} of {res['tasks']} tasks; rest diverged)"
            else:
                x = [s for s, d in zip(steps, diverged, strict=True) if d == 0]
                mean = [m for m, d in zip(vals["mse"], diverged, strict=True) if d == 0]
                ci = [c for c, d in zip(vals["ci95"], diverged, strict=True) if d == 0]
            mean, ci = torch.tensor(mean), torch.tensor(ci)
            ax.plot(x, mean, marker="o", ms=3, label=label)
            ax.fill_between(x, mean - ci, mean + ci, alpha=0.25)
        ax.set_ylim(0, top)
        ax.set_title(f"k-shot regression, {key}")
        ax.set_xlabel("number of gradient steps")
        ax.set_ylabel("mean squared error")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(exp: SinusoidExperiment, run: Run, baseline: Run | None) -> list[Path]:
    from .evaluation import evaluate_run

    out = [figure2(exp, run, baseline, run.plots / "figure2_sinusoid_fits.png")]
    results = [evaluate_run(run, exp.device, reuse=True)]
    if baseline is not None:
        results.append(evaluate_run(baseline, exp.device, reuse=True))
    out.append(figure3(results, run.plots / "figure3_mse_vs_steps.png"))
    curves = plot_training_curves(run, ["loss"], run.plots / "training_loss.png", log=True)
    if curves is not None:
        out.append(curves)
    assert (run.path / EVAL).exists()
    return out
