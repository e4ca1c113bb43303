"""Shared plotting helpers (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .runs import Run  # noqa: E402


def plot_training_curves(
    run: Run, keys: Sequence[str], path: Path, *, log: bool = False, title: str = ""
) -> Path | None:
    """Metrics from ``metrics.csv`` against the iteration; None when nothing was logged."""
    rows = run.metrics()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    drawn = False
    for key in keys:
        pts = [(r["iteration"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=key)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("meta-iteration")
    if log:
        ax.set_yscale("log")
    ax.set_title(title or run.path.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
