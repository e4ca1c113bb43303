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
    """``MAML(model, loss_fn, learn_lr="per-parameter", ...)``.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> import metagrad as mg
        >>> model = torch.nn.Linear(3, 1)
        >>> msgd = mg.MetaSGD(model, F.mse_loss, inner_lr=0.01)
        >>> {n: tuple(r.shape) for n, r in msgd.learned_lrs().items()}  # a rate per entry
        {'weight': (1, 3), 'bias': (1,)}
        >>> len(list(msgd.parameters()))  # the model's two tensors and their two rates
        4
    """

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, inner_lr: float = 0.01, **kwargs: Any
    ) -> None:
        if kwargs.get("learn_lr", "per-parameter") != "per-parameter":
            raise TypeError("MetaSGD learns per-parameter rates; use MAML(learn_lr=...) for others")
        kwargs.pop("learn_lr", None)
        super().__init__(model, loss_fn, inner_lr=inner_lr, learn_lr="per-parameter", **kwargs)
