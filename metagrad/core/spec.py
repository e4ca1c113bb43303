"""The adaptation spec: what adapts in the inner loop, at which rates, by which rule, and
which loss the outer loop sees.

A :class:`Spec` is static (hashable, fixed when a learner is built). What may change while
training, the learned rates and the multi-step loss weights, are tensors passed beside it as
:class:`Hyper`, so that compiled functions take them as inputs instead of capturing them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from .inner import SGD, UpdateRule

Params = dict[str, Tensor]
AdaptArg = Callable[[str], bool] | Sequence[str] | None
LEARN_LR = (None, "per-parameter", "per-layer-per-step")


class Hyper(NamedTuple):
    """The tensors of a spec: learned rates ``{name: tensor}`` (empty when fixed) and the
    per-step weights of the multi-step loss (``None``: the last step's query loss)."""

    rates: Params
    weights: Tensor | None


@dataclass(frozen=True)
class Spec:
    """The static part of an adaptation.

    Attributes:
        adapts: names of the parameters updated by the inner loop, in model order.
        steps: inner steps during meta-training.
        lr: the fixed inner rate, and the initial value of learned ones.
        first_order: inner gradients as constants (no second-order terms).
        learn_lr: ``None`` (fixed ``lr``), ``"per-parameter"`` (a learned tensor of each
            parameter's shape, Meta-SGD) or ``"per-layer-per-step"`` (a learned scalar per
            parameter tensor and step, MAML++ LSLR).
        rule: the update rule (:mod:`metagrad.core.inner`).
        multi_step: the outer loss is a weighted sum of the query losses after each step.
        checkpoint: each second-order inner step's graph is rebuilt in the backward pass
            instead of kept (:mod:`.recompute`): memory of one step's graph.
        stepwise: the model's ``forward`` takes a keyword ``step`` and is given the inner
            step index: ``k`` for the support pass of step ``k`` and for the query pass after
            it (0 before any step); per-step layers such as MAML++'s BatchNorm use it.
    """

    adapts: tuple[str, ...]
    steps: int
    lr: float
    first_order: bool = False
    learn_lr: str | None = None
    rule: UpdateRule = field(default_factory=SGD)
    multi_step: bool = False
    checkpoint: bool = False
    stepwise: bool = False

    def rate(self, name: str, step: int, hyper: Hyper) -> float | Tensor:
        """The inner rate of parameter ``name`` at step ``step`` (0-based). Per-step rates
        past the learned ones (more steps at test time than in training) reuse the last."""
        if self.learn_lr is None:
            return self.lr
        r = hyper.rates[name]
        if self.learn_lr == "per-layer-per-step":
            return r[min(step, r.shape[0] - 1)]
        return r


def select(names: Iterable[str], adapt: AdaptArg, trainable: set[str]) -> tuple[str, ...]:
    """The adapting parameter names: ``None`` every trainable one; a callable ``name ->
    bool``; or name prefixes (``"head"`` matches ``head.weight`` but not ``header.weight``;
    ``"head."`` and full names work too)."""
    names = list(names)
    if adapt is None:
        chosen = [n for n in names if n in trainable]
        what = "adapt=None (every parameter that requires grad)"
    elif callable(adapt):
        chosen = [n for n in names if adapt(n)]
        what = "the adapt predicate"
    else:
        if isinstance(adapt, str):
            adapt = [adapt]
        prefixes = list(adapt)
        if not prefixes or not all(isinstance(p, str) and p for p in prefixes):
            raise ValueError(f"adapt must be None, a callable or name prefixes, got {adapt!r}")

        def match(n: str, p: str) -> bool:
            return n == p or n.startswith(p if p.endswith(".") else p + ".")

        chosen = [n for n in names if any(match(n, p) for p in prefixes)]
        what = f"adapt={prefixes!r}"
    if not chosen:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise ValueError(f"{what} selects no parameter of the model (parameters: {shown})")
    return tuple(chosen)


def takes_step(model: torch.nn.Module) -> bool:
    """Whether ``model.forward`` accepts a keyword ``step`` (the inner step index)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    p = params.get("step")
    return p is not None and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)


def check_arguments(inner_lr: float, inner_steps: int, rule: object, vectorize: object,
                    checkpoint: bool = False, compile: bool | None = False) -> None:  # fmt: skip
    """One clear error for each bad learner argument."""
    if checkpoint and (vectorize not in (None, False) or compile):
        raise ValueError("checkpoint=True runs tasks one by one, eagerly: vectorize must be "
                         "None or False and compile False")  # fmt: skip
    if vectorize not in (None, True, False, "support"):
        raise ValueError(f"vectorize must be None, True, False or 'support', got {vectorize!r}")
    if inner_steps < 0:
        raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
    if inner_lr <= 0:
        raise ValueError(f"inner_lr must be > 0, got {inner_lr}")
    if rule is not None and not isinstance(rule, UpdateRule):
        raise TypeError(f"inner_optimizer must be mg.inner.SGD or mg.inner.Adam, got {rule!r}")


def check_learn_lr(learn_lr: str | None) -> str | None:
    if learn_lr not in LEARN_LR:
        raise ValueError(
            f"learn_lr must be None, 'per-parameter' or 'per-layer-per-step', got {learn_lr!r}"
        )
    return learn_lr


def initial_rates(spec: Spec, params: Params) -> Params:
    """Learned rates at their start value ``spec.lr``: ``{name: tensor}``."""
    if spec.learn_lr is None:
        return {}
    out = {}
    for n in spec.adapts:
        p = params[n]
        shape = p.shape if spec.learn_lr == "per-parameter" else (max(spec.steps, 1),)
        out[n] = torch.full(shape, spec.lr, dtype=p.dtype, device=p.device)
    return out


def step_weights_tensor(weights: Sequence[float] | Tensor, steps: int) -> Tensor:
    """Validated multi-step loss weights as a float tensor of length ``steps``."""
    w = torch.as_tensor(weights, dtype=torch.float64).detach().flatten()
    if w.numel() != steps:
        raise ValueError(
            f"step_weights has {w.numel()} weights for inner_steps={steps}; give one per step"
        )
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"step_weights must be finite and >= 0, got {w.tolist()}")
    return w
