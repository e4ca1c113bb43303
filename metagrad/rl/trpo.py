"""TRPO pieces against plain lists of tensors and closures.

The MAML outer loop optimises the pre-update parameters ``theta`` (a list of tensors)
of a surrogate loss ``loss_fn(theta)`` under a trust region ``kl_fn(theta) <= max_kl``,
where both closures run the inner adaptation from ``theta`` themselves and evaluate
post-update policies. Everything here only calls those closures on lists of tensors.
The conjugate gradient and the KL Hessian-vector products (exact by double backward, or
rllab's finite difference with ``base_eps = 1``) live in :mod:`metagrad.core.linalg`,
shared with the rest of the library; they are re-exported here.

* :func:`line_search` tries ``params + 0.8^k * full_step`` for ``k = 0..14`` and accepts
  the first that lowers the loss with ``KL <= max_kl``; otherwise it returns the old
  parameters and ``accepted=False`` (rllab rejects the same way).
* :func:`trpo_step` chains them: gradient ``g`` of the loss, ``s = CG(H, g)``, step
  ``-sqrt(2 max_kl / (s.Hs + 1e-8)) s`` (step scale 1 if that is NaN), line search.
  ``s.Hs`` is ``s.(g - r)`` with the conjugate gradient's residual ``r = g - H s``
  (accumulated from its own products), where rllab spent one more product on ``H s``.

``damping`` (rllab's ``reg_coeff``, 1e-5) is added inside the HVP as ``Hv + damping v``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..core.linalg import (
    HVP,
    Closure,
    conjugate_gradient,
    conjugate_gradient_residual,
    flatten,
    grads,
    hvp_exact,
    hvp_finite_difference,
    leaves,
    unflatten,
)

__all__ = [
    "HVP",
    "Closure",
    "LineSearchResult",
    "TRPOStepResult",
    "conjugate_gradient",
    "flatten",
    "hvp_exact",
    "hvp_finite_difference",
    "line_search",
    "trpo_step",
    "unflatten",
]


def _item(x: Tensor | float) -> float:
    return float(x.detach()) if isinstance(x, Tensor) else float(x)


@dataclass
class LineSearchResult:
    """Outcome of :func:`line_search`; ``params`` are the old ones when not accepted."""

    params: list[Tensor]
    accepted: bool
    step_fraction: float
    backtracks: int
    loss: float
    kl: float


def line_search(
    eval_fn: Callable[[list[Tensor]], tuple[Tensor | float, Tensor | float]],
    params: Sequence[Tensor],
    full_step: Sequence[Tensor] | Tensor,
    loss_before: float,
    max_kl: float = 0.01,
    backtrack_ratio: float = 0.8,
    max_backtracks: int = 15,
) -> LineSearchResult:
    """Backtracking line search on ``params + backtrack_ratio^k * full_step``.

    ``eval_fn(candidate) -> (loss, kl)``. Accepts the first ``k`` in
    ``0..max_backtracks-1`` whose loss is finite and below ``loss_before`` with a finite
    ``kl <= max_kl``; if none is, returns the old ``params`` (detached copies) and
    ``accepted=False`` with the last candidate's loss and KL. Candidates are passed as
    fresh leaf tensors with ``requires_grad=True`` (so an inner adaptation step inside
    ``eval_fn`` may differentiate them); the returned ones are detached.
    """
    theta = [p.detach() for p in params]
    steps = unflatten(full_step, theta) if isinstance(full_step, Tensor) else list(full_step)
    loss = kl = math.nan
    for k in range(max_backtracks):
        frac = backtrack_ratio**k
        cand = leaves([t + frac * s.detach() for t, s in zip(theta, steps, strict=True)])
        loss_t, kl_t = eval_fn(cand)
        loss, kl = _item(loss_t), _item(kl_t)
        if math.isfinite(loss) and math.isfinite(kl) and loss < loss_before and kl <= max_kl:
            return LineSearchResult([c.detach() for c in cand], True, frac, k, loss, kl)
    return LineSearchResult([t.clone() for t in theta], False, 0.0, max_backtracks, loss, kl)


@dataclass
class TRPOStepResult:
    """Outcome of :func:`trpo_step`; ``params`` are the old ones when not accepted."""

    params: list[Tensor]
    accepted: bool
    loss_before: float
    loss_after: float
    kl_after: float
    backtracks: int
    step_scale: float


def _rows(x: Tensor | float, dims: int) -> Tensor:
    """``x`` with a leading row dimension (one row if it has none)."""
    x = torch.as_tensor(x).detach()
    return x if x.dim() == dims else x.reshape(1, *x.shape[x.dim() - dims + 1 :])


def _reduced_avp(avp: HVP, reduce: Callable[[Tensor], Tensor], damping: float) -> HVP:
    return lambda v: reduce(_rows(avp(v), 2)) + damping * v


def _reduced_scores(
    fn: Callable[[list[Tensor]], tuple[Tensor | float, Tensor | float]],
    reduce: Callable[[Tensor], Tensor],
) -> Callable[[list[Tensor]], tuple[float, float]]:
    def scores(cand: list[Tensor]) -> tuple[float, float]:
        loss, kl = fn(cand)
        rows = torch.stack([_rows(loss, 1), _rows(kl, 1)], 1).to(torch.float64)
        total = reduce(rows)
        return float(total[0]), float(total[1])

    return scores


def trpo_step(
    loss_fn: Closure,
    kl_fn: Closure,
    params: Sequence[Tensor],
    max_kl: float = 0.01,
    damping: float = 1e-5,
    cg_iters: int = 10,
    backtrack_ratio: float = 0.8,
    max_backtracks: int = 15,
    hvp: Literal["exact", "finite_difference"] | Callable[[list[Tensor], float], HVP] = "exact",
    fd_base_eps: float = 1.0,
    evaluate: Callable[[Sequence[Tensor]], tuple[float, float]] | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
    gradient: Callable[[list[Tensor]], tuple[Tensor, Tensor]] | None = None,
) -> TRPOStepResult:
    """One TRPO update of ``params`` minimising ``loss_fn`` subject to ``kl_fn <= max_kl``.

    ``evaluate(theta) -> (loss, kl)`` scores line-search candidates (default: ``loss_fn``
    and ``kl_fn``); pass a cheaper one that needs no gradient graph when there is one.

    ``kl_fn(theta)`` must be the KL between the fixed old policy and the policy at
    ``theta`` (zero, with zero gradient, at ``params``). ``hvp``: the KL Hessian-vector
    product by double backward (``"exact"``), by finite differences, or a callable
    ``hvp(theta, damping) -> (v -> H v + damping v)`` (e.g. a Fisher-vector product).

    ``gradient(theta) -> (loss, flat gradient)`` replaces differentiating ``loss_fn``.

    ``reduce`` (several processes): each process's closures hold its share of the objective
    (its tasks' sum over the total), as rows: ``reduce(rows)`` sums the rows (first
    dimension) of every process, in one fixed order. The gradient, every Hessian-vector
    product and every line-search score are reduced, so all processes take the same step.
    Values without a row dimension (a scalar loss, a flat gradient) count as one row; a
    ``gradient``, ``hvp`` or ``evaluate`` may return one row per task (``[tasks]``,
    ``[tasks, P]``), which makes the sum independent of how tasks are spread.
    """
    if not callable(hvp) and hvp not in ("exact", "finite_difference"):
        raise ValueError(f"hvp must be 'exact', 'finite_difference' or a callable, got {hvp!r}")
    theta = leaves(params)
    if gradient is None:
        loss = loss_fn(theta)
        g = flatten(grads(loss, theta)).detach()
        loss = loss.detach()  # frees the loss graph before the Hessian-vector products
    else:
        loss, g = gradient(theta)
    if reduce is not None:
        g = reduce(_rows(g, 2))
        loss = reduce(_rows(loss, 1))
    loss_before = _item(loss.sum())
    local_damping = damping if reduce is None else 0.0  # added once, after the sum
    if callable(hvp):
        avp = hvp(theta, local_damping)
    elif hvp == "exact":
        avp = hvp_exact(kl_fn, theta, local_damping)
    else:
        avp = hvp_finite_difference(kl_fn, theta, local_damping, base_eps=fd_base_eps)
    if reduce is not None:
        avp = _reduced_avp(avp, reduce, damping)
        evaluate = _reduced_scores(evaluate or (lambda c: (loss_fn(c), kl_fn(c))), reduce)
    direction, residual = conjugate_gradient_residual(avp, g, iters=cg_iters)
    shs = float(direction.dot(g - residual))  # s^T A s, as A s = g - residual
    scale = math.sqrt(2.0 * max_kl / (shs + 1e-8)) if shs + 1e-8 > 0 else math.nan
    if math.isnan(scale):
        scale = 1.0
    result = line_search(
        evaluate or (lambda cand: (loss_fn(cand), kl_fn(cand))),
        theta,
        -scale * direction,
        loss_before,
        max_kl=max_kl,
        backtrack_ratio=backtrack_ratio,
        max_backtracks=max_backtracks,
    )
    return TRPOStepResult(
        params=result.params,
        accepted=result.accepted,
        loss_before=loss_before,
        loss_after=result.loss,
        kl_after=result.kl,
        backtracks=result.backtracks,
        step_scale=scale,
    )
