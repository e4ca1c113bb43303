"""The MAML paper's few-shot classifiers.

``Conv4``: four blocks of 3x3 convolution, BatchNorm on batch statistics
(``track_running_stats=False``, as MAML uses it: every forward normalises with the
current batch, at training and test time), ReLU, then a linear layer.

* Omniglot (``omniglot_conv4``): 64 filters, stride-2 convolutions, no pooling; the
  2x2 output is averaged over space before the linear layer (as the original code does).
* MiniImagenet (``miniimagenet_conv4``): 32 filters, stride 1, 2x2 max-pooling; the
  5x5 output is flattened (800 features).

``FCNet``: the paper's non-convolutional Omniglot network, 256-128-64-64 with BatchNorm
and ReLU.

In the original TensorFlow code the BatchNorm offsets are meta-learned but not adapted in
the inner loop (and it has no scale). What adapts is the learner's business, not the
model's: ``MAML(adapt=None)`` adapts every parameter, BatchNorm's included, like the
PyTorch ports; the presets default to ``adapt=no-norm``, the original's choice.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .norm import StepBatchNorm


def _block(cin: int, cout: int, stride: int, pool: bool, norm: nn.Module | None = None,
           act: nn.Module | None = None) -> nn.Sequential:  # fmt: skip
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
        norm if norm is not None else nn.BatchNorm2d(cout, track_running_stats=False),
        act if act is not None else nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Conv4(nn.Module):
    """Four blocks of 3x3 convolution, BatchNorm (batch statistics), ReLU (and 2x2
    max-pooling with ``pool``), then a linear layer to ``ways`` logits: the spatial mean of
    the last block's output (``spatial_mean``) or its ``features`` flattened values.

    Example:
        >>> import torch
        >>> import metagrad as mg
        >>> net = mg.models.omniglot_conv4(ways=5)
        >>> net(torch.zeros(10, 1, 28, 28)).shape
        torch.Size([10, 5])
        >>> mg.models.miniimagenet_conv4(ways=5)(torch.zeros(2, 3, 84, 84)).shape
        torch.Size([2, 5])
    """

    def __init__(
        self,
        ways: int,
        in_channels: int = 1,
        filters: int = 64,
        *,
        stride: int = 2,
        pool: bool = False,
        spatial_mean: bool = True,
        features: int | None = None,
    ) -> None:
        super().__init__()
        chans = [in_channels, filters, filters, filters, filters]
        self.features = nn.Sequential(
            *(_block(a, b, stride, pool) for a, b in zip(chans[:-1], chans[1:], strict=True))
        )
        self.spatial_mean = spatial_mean
        self.head = nn.Linear(features or filters, ways)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)
        h = h.mean((-2, -1)) if self.spatial_mean else h.flatten(1)
        return self.head(h)


class StepConv4(Conv4):
    """MAML++'s network: :class:`Conv4` with per-step BatchNorm (:class:`StepBatchNorm`),
    stride-1 convolutions, 2x2 max-pooling, leaky ReLU, flattened features; its ``forward``
    takes the inner step index."""

    def __init__(self, ways: int, in_channels: int, filters: int, steps: int, *, features: int,
                 per_step_weights: bool = True, per_step_stats: bool = False) -> None:  # fmt: skip
        super().__init__(ways, in_channels, filters, stride=1, pool=True, spatial_mean=False,
                         features=features)  # fmt: skip
        chans = [in_channels, filters, filters, filters, filters]
        self.features = nn.Sequential(*(
            _block(a, b, 1, True, StepBatchNorm(b, steps, per_step_weights=per_step_weights,
                                                track_running_stats=per_step_stats),
                   nn.LeakyReLU())
            for a, b in zip(chans[:-1], chans[1:], strict=True)
        ))  # fmt: skip

    def forward(self, x: Tensor, step: int | None = None) -> Tensor:  # type: ignore[override]
        h = x
        for block in self.features:
            for layer in block:
                h = layer(h, step) if isinstance(layer, StepBatchNorm) else layer(h)
        return self.head(h.flatten(1))


def omniglot_conv4(ways: int, filters: int = 64) -> Conv4:
    """The MAML paper's Omniglot network: stride-2 convolutions, spatial mean, 28x28x1 in."""
    return Conv4(ways, 1, filters, stride=2, pool=False, spatial_mean=True)


def miniimagenet_conv4(ways: int, filters: int = 32) -> Conv4:
    """The MAML paper's MiniImagenet network: 2x2 max-pooling, 84x84x3 in."""
    return Conv4(ways, 3, filters, stride=1, pool=True, spatial_mean=False, features=filters * 25)


def mamlpp_conv4(ways: int, steps: int, *, image: int = 28, in_channels: int = 1,
                 filters: int = 64, per_step_weights: bool = True,
                 per_step_stats: bool = False) -> StepConv4:  # fmt: skip
    """MAML++'s conv4 for ``image`` x ``image`` inputs (Omniglot 28: 64 filters;
    MiniImagenet 84, 3 channels: the reference code's 48 filters), with a BatchNorm row per
    inner step (``steps``); its ``forward(x, step=k)`` runs at step ``k``.

    Example:
        >>> import torch
        >>> import metagrad as mg
        >>> net = mg.models.mamlpp_conv4(ways=5, steps=5, filters=8)
        >>> net(torch.zeros(4, 1, 28, 28), step=2).shape
        torch.Size([4, 5])
    """
    side = image
    for _ in range(4):
        side //= 2
    return StepConv4(ways, in_channels, filters, steps, features=filters * side * side,
                     per_step_weights=per_step_weights, per_step_stats=per_step_stats)  # fmt: skip


class FCNet(nn.Module):
    """Flattened image -> hidden layers with BatchNorm and ReLU -> ``ways`` logits."""

    def __init__(
        self, ways: int, in_features: int = 784, hidden: Sequence[int] = (256, 128, 64, 64)
    ):
        super().__init__()
        sizes = [in_features, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b, track_running_stats=False), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], ways))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
