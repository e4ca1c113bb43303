"""Means with 95% confidence intervals: over test tasks the normal approximation (1.96
standard errors, as the MAML paper reports them), over a few training seeds Student's t."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# the 0.975 quantile of Student's t for 1..9 degrees of freedom
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622)
_Z975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (the multiplier of
    the standard error in a two-sided 95% interval). A table up to 9; from 10 on the
    Cornish-Fisher expansion to 1/df^3, within 2e-4 of the exact value there."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / df + g2 / df**2 + g3 / df**3


def mean_ci95(
    values: Tensor, dim: int = 0, *, student: bool = False
) -> tuple[list[float], list[float]]:
    """Mean and half-width of the 95% CI along ``dim``: 1.96 standard errors, or with
    ``student`` the t quantile for ``n - 1`` degrees of freedom (few samples, e.g. seeds)."""
    v = values.double()
    n = v.shape[dim]
    mean = v.mean(dim)
    if n < 2:
        return mean.tolist(), torch.zeros_like(mean).tolist()
    factor = t_quantile_975(n - 1) if student else 1.96
    half = factor * v.std(dim, unbiased=True) / math.sqrt(n)
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
