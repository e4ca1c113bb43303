"""Differentiable inner-loop update rules: plain SGD, SGD with momentum, Adam.

Each rule turns the inner gradients of one step into an update direction ``d`` (the step
is ``p <- p - lr * d``, with ``lr`` a fixed or learned rate) and carries its own state, which
starts at zero for every task. The formulas are torch.optim's (no weight decay, no
dampening): SGD ``v <- mu v + g``, ``d = v`` (``d = g + mu v`` with Nesterov); Adam
``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g^2``, ``d = m_hat / (sqrt(v_hat) + eps)``
with the bias corrections ``1 - b^t`` of step ``t = k + 1``. Everything is a pure function
of tensors, so a rule differentiates (second order), runs under ``vmap`` and compiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

Params = dict[str, Tensor]
State = dict[str, tuple[Tensor, ...]]


def _safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` whose derivative at ``x = 0`` is 0 instead of inf, so that an exactly
    zero gradient (an unused parameter, a bias before a normalisation) does not turn the
    second-order meta-gradient into NaN (inf * 0). Values are unchanged."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1.0).sqrt(), 0.0)


@dataclass(frozen=True)
class SGD:
    """Inner-loop SGD; ``momentum=0`` is MAML's plain gradient step (no state)."""

    momentum: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"SGD momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("SGD nesterov=True needs a momentum > 0")

    def init(self, params: Params) -> State:
        return {}

    def direction(self, grads: Params, state: State, step: int) -> tuple[Params, State]:
        if self.momentum == 0:
            return grads, state
        mu = self.momentum
        bufs = {k: g if step == 0 else mu * state[k][0] + g for k, g in grads.items()}
        if self.nesterov:
            return {k: g + mu * bufs[k] for k, g in grads.items()}, {
                k: (b,) for k, b in bufs.items()
            }
        return bufs, {k: (b,) for k, b in bufs.items()}


@dataclass(frozen=True)
class Adam:
    """Inner-loop Adam with torch.optim.Adam's bias-corrected update.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> import metagrad as mg
        >>> model = torch.nn.Linear(2, 1)
        >>> maml = mg.MAML(model, F.mse_loss, inner_lr=0.001, inner_steps=5,
        ...                inner_optimizer=mg.inner.Adam(betas=(0.0, 0.999)))
        >>> maml.spec().rule
        Adam(betas=(0.0, 0.999), eps=1e-08)
    """

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        b1, b2 = self.betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"Adam betas must be in [0, 1), got {self.betas}")
        if self.eps <= 0:
            raise ValueError(f"Adam eps must be > 0, got {self.eps}")

    def init(self, params: Params) -> State:
        return {}

    def direction(self, grads: Params, state: State, step: int) -> tuple[Params, State]:
        b1, b2 = self.betas
        c1, c2 = 1.0 - b1 ** (step + 1), 1.0 - b2 ** (step + 1)
        new: State = {}
        out: Params = {}
        for k, g in grads.items():
            if step == 0:  # the state starts at zero: m = (1 - b1) g, v = (1 - b2) g^2
                m, v = (1.0 - b1) * g, (1.0 - b2) * (g * g)
            else:
                m0, v0 = state[k]
                m, v = b1 * m0 + (1.0 - b1) * g, b2 * v0 + (1.0 - b2) * (g * g)
            new[k] = (m, v)
            out[k] = (m / c1) / (_safe_sqrt(v / c2) + self.eps)
        return out, new


UpdateRule = SGD | Adam

__all__ = ["SGD", "Adam", "UpdateRule"]
