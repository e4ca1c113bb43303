"""ANIL, "Almost No Inner Loop" (Raghu, Raghu, Bengio, Vinyals, ICLR 2020).

Only the head adapts in the inner loop; the body is meta-learned and held fixed inside it,
its meta-gradient flowing through the features the head is adapted on.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core import MAML
from ..core.functional import LossFn


class ANIL(MAML):
    """``MAML(model, loss_fn, adapt=[head], ...)``: ``head`` names the head's parameters by
    prefix (``"classifier"`` adapts ``classifier.weight`` and ``classifier.bias``).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> import metagrad as mg
        >>> from torch import nn
        >>> net = nn.Sequential()
        >>> net.add_module("body", nn.Sequential(nn.Linear(4, 16), nn.ReLU()))
        >>> net.add_module("head", nn.Linear(16, 3))
        >>> anil = mg.ANIL(net, F.cross_entropy, head="head", inner_lr=0.1, inner_steps=2)
        >>> anil.spec().adapts  # the body is meta-learned, never adapted
        ('head.weight', 'head.bias')
    """

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, head: str = "head", **kwargs: Any
    ) -> None:
        if "adapt" in kwargs:
            raise TypeError("ANIL chooses what adapts from head=; use MAML(adapt=...) instead")
        modules = dict(model.named_modules())
        if not head or head.rstrip(".") not in modules:
            heads = [n for n, m in model.named_modules() if n and not list(m.children())]
            raise ValueError(f"ANIL head {head!r} is not a submodule of the model (leaf modules: {', '.join(heads)})")  # fmt: skip
        super().__init__(model, loss_fn, adapt=[head.rstrip(".")], **kwargs)
        self.head = head.rstrip(".")
