"""Means with 95% confidence intervals (normal approximation, as in the MAML paper)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def mean_ci95(values: Tensor, dim: int = 0) -> tuple[list[float], list[float]]:
    """Mean and half-width of the 95% CI (1.96 standard errors) along ``dim``."""
    v = values.double()
    n = v.shape[dim]
    mean = v.mean(dim)
    half = 1.96 * v.std(dim, unbiased=True) / math.sqrt(n) if n > 1 else torch.zeros_like(mean)
    return mean.tolist(), half.tolist()


def summarize_curves(curves: Tensor, blowup: float = 1e6) -> dict[str, list[float] | int]:
    """Per-step statistics of loss curves ``[tasks, steps+1]`` where some tasks may diverge.

    Plain gradient descent at a fixed step size can diverge on a rare task; the mean over
    all tasks is then inf (or absurdly large) and says nothing about the others. Beside
    the plain mean and CI this reports, per step, the number of ``diverged`` tasks (non-finite
    or above ``blowup``) and the ``median``; and over the ``converged_tasks`` (those finite at
    every step) their mean ``mse_converged`` with its ``ci95_converged``.
    """
    mean, ci = mean_ci95(curves)
    bad = ~torch.isfinite(curves) | (curves > blowup)
    ok = ~bad.any(1)
    conv_mean, conv_ci = mean_ci95(curves[ok]) if ok.any() else ([math.nan] * len(mean),) * 2
    return {
        "mse": mean,
        "ci95": ci,
        "median": curves.nan_to_num(nan=math.inf).median(0).values.tolist(),
        "diverged": bad.sum(0).tolist(),
        "converged_tasks": int(ok.sum()),
        "mse_converged": conv_mean,
        "ci95_converged": conv_ci,
    }
