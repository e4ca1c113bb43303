"""BatchNorm with one row per inner step (MAML++'s per-step BatchNorm).

MAML++ (Antoniou et al., 2019) gives each inner step its own BatchNorm affine parameters
(BNWB) and its own running statistics (BNRS). :class:`StepBatchNorm` holds them as
``[steps, features]`` tensors and its ``forward(x, step)`` uses row ``step`` (the last row
for later steps; row 0 when called without a step, e.g. ``model(x)``). metagrad's inner loop
passes the step to any model whose ``forward`` takes a keyword ``step``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class StepBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over ``[N, C, ...]`` with per-step rows.

    Args:
        num_features: channels ``C``.
        steps: inner steps, the rows of the per-step tensors.
        per_step_weights: a weight and bias row per step (BNWB); else one shared pair.
        track_running_stats: keep running statistics, a row per step (BNRS): updated by
            step ``k``'s passes in training mode, used in evaluation mode (``.eval()``), as
            ``nn.BatchNorm2d`` does with its one row. Without them every pass normalises
            with the statistics of its batch (MAML's choice).
    """

    def __init__(self, num_features: int, steps: int, *, per_step_weights: bool = True,
                 track_running_stats: bool = False, eps: float = 1e-5,
                 momentum: float = 0.1) -> None:  # fmt: skip
        if steps < 1:
            raise ValueError(f"StepBatchNorm needs steps >= 1, got {steps}")
        super().__init__(num_features, eps, momentum, affine=True,
                         track_running_stats=track_running_stats)  # fmt: skip
        self.steps, self.per_step_weights = int(steps), bool(per_step_weights)
        if per_step_weights:
            self.weight = nn.Parameter(torch.ones(steps, num_features))
            self.bias = nn.Parameter(torch.zeros(steps, num_features))
        if track_running_stats:
            self.running_mean = torch.zeros(steps, num_features)
            self.running_var = torch.ones(steps, num_features)

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"StepBatchNorm expects [N, C, ...] input, got shape {tuple(x.shape)}")

    def forward(self, x: Tensor, step: int | None = None) -> Tensor:  # type: ignore[override]
        self._check_input_dim(x)
        k = 0 if step is None else min(int(step), self.steps - 1)
        w, b = (self.weight[k], self.bias[k]) if self.per_step_weights else (self.weight, self.bias)
        if not self.track_running_stats:
            return F.batch_norm(x, None, None, w, b, True, 0.0, self.eps)
        assert self.running_mean is not None and self.running_var is not None
        # a view of row k: batch_norm updates it in place in training mode
        return F.batch_norm(x, self.running_mean[k], self.running_var[k], w, b, self.training,
                            self.momentum, self.eps)  # fmt: skip

    def extra_repr(self) -> str:
        return (f"{self.num_features}, steps={self.steps}, per_step_weights={self.per_step_weights}, "
                f"track_running_stats={self.track_running_stats}")  # fmt: skip
