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
