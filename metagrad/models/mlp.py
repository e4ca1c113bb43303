"""Fully connected networks (the sinusoid regressor 1-40-40-1 and friends)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class MLP(nn.Module):
    """``in -> hidden... -> out`` with ReLU between layers (none after the last).

    Example:
        >>> import torch
        >>> import metagrad as mg
        >>> mg.models.MLP(1, [40, 40], 1)(torch.zeros(10, 1)).shape  # the sinusoid regressor
        torch.Size([10, 1])
    """

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int) -> None:
        super().__init__()
        sizes = [in_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
