"""Meta-SGD (Li, Zhou, Chen, Li, 2017): a learned inner rate for every parameter entry.

The inner step is ``theta' = theta - alpha * grad`` with ``alpha`` a tensor of ``theta``'s
shape, meta-learned with ``theta`` (the paper's element-wise product); ``alpha`` starts at
``inner_lr``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core import MAML
from ..core.functional import LossFn


class MetaSGD(MAML):
    """``MAML(model, loss_fn, learn_lr="per-parameter", ...)``."""

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, inner_lr: float = 0.01, **kwargs: Any
    ) -> None:
        if kwargs.get("learn_lr", "per-parameter") != "per-parameter":
            raise TypeError("MetaSGD learns per-parameter rates; use MAML(learn_lr=...) for others")
        kwargs.pop("learn_lr", None)
        super().__init__(model, loss_fn, inner_lr=inner_lr, learn_lr="per-parameter", **kwargs)
