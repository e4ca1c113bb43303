"""TRPO pieces against plain lists of tensors and closures.

The MAML outer loop optimises the pre-update parameters ``theta`` (a list of tensors)
of a surrogate loss ``loss_fn(theta)`` under a trust region ``kl_fn(theta) <= max_kl``,
where both closures run the inner adaptation from ``theta`` themselves and evaluate
post-update policies. Everything here only calls those closures on lists of tensors:

* :func:`conjugate_gradient` solves ``A x = b`` for a matrix-free ``A`` (10 iterations,
  stopping early when ``r.r < 1e-10``, as rllab's ``krylov.cg``).
* :func:`hvp_exact` gives ``v -> H v + damping v`` with ``H`` the Hessian of
  ``kl_fn`` at ``theta`` by double backward (Pearlmutter): the gradient graph is built
  once and differentiated again for every ``v``. For MAML this differentiates through
  the inner gradient step, so the closure's inner step must build a graph
  (``create_graph=True`` / ``torch.func.grad``).
* :func:`hvp_finite_difference` gives ``(g(theta + r v) - g(theta - r v)) / 2r +
  damping v`` with ``g`` the KL gradient and ``r = base_eps / (||theta|| + 1e-8)`` as
  rllab's ``FiniteDifferenceHvp``; it needs only first derivatives of the closure
  (maml_rl's TRPO optimizer uses it by default). rllab's class default is
  ``base_eps = 1e-8``, but maml_rl's ``ConjugateGradientOptimizer`` constructs it as
  ``FiniteDifferenceHvp(num_slices)``, which passes ``num_slices = 1`` positionally as
  ``base_eps``: MAML-TRPO ran with ``base_eps = 1``, our default too. Measured on a
  17-100-100-6 ReLU policy (``||theta|| = 11.9``, ``v`` a surrogate gradient of norm
  0.31), relative error against the exact product in float32: 3e-3 (``base_eps = 1``),
  3e-4 (1e-2), 0.38 (1e-5), 1.0 (1e-8: the perturbation vanishes in rounding).
* :func:`line_search` tries ``params + 0.8^k * full_step`` for ``k = 0..14`` and accepts
  the first that lowers the loss with ``KL <= max_kl``; otherwise it returns the old
  parameters and ``accepted=False`` (rllab rejects the same way).
* :func:`trpo_step` chains them: gradient ``g`` of the loss, ``s = CG(H, g)``, step
  ``-sqrt(2 max_kl / (s.Hs + 1e-8)) s`` (step scale 1 if that is NaN), line search.

``damping`` (rllab's ``reg_coeff``, 1e-5) is added inside the HVP as ``Hv + damping v``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Closure = Callable[[Sequence[Tensor]], Tensor]
"""A scalar function of a list of parameter tensors (loss or KL)."""
HVP = Callable[[Tensor], Tensor]
"""A flat vector -> flat vector linear map."""


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one flat vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector into tensors shaped like ``like``."""
    total = sum(t.numel() for t in like)
    if flat.numel() != total:
        raise ValueError(f"flat vector has {flat.numel()} elements, shapes need {total}")
    out, i = [], 0
    for t in like:
        n = t.numel()
        out.append(flat[i : i + n].view_as(t))
        i += n
    return out


def _grads(out: Tensor, params: Sequence[Tensor], create_graph: bool = False) -> list[Tensor]:
    if not out.requires_grad:
        return [torch.zeros_like(p) for p in params]
    gs = torch.autograd.grad(
        out, list(params), create_graph=create_graph, retain_graph=True, allow_unused=True
    )
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params, strict=True)]


def _item(x: Tensor | float) -> float:
    return float(x.detach()) if isinstance(x, Tensor) else float(x)


def _leaves(params: Sequence[Tensor]) -> list[Tensor]:
    return [p.detach().requires_grad_(True) for p in params]


def conjugate_gradient(avp: HVP, b: Tensor, iters: int = 10, residual_tol: float = 1e-10) -> Tensor:
    """Approximately solve ``A x = b`` for symmetric positive-definite ``A`` given ``avp``."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rdotr = r.dot(r)
    for _ in range(iters):
        if rdotr < residual_tol:
            break
        z = avp(p)
        alpha = rdotr / p.dot(z)
        x = x + alpha * p
        r = r - alpha * z
        new_rdotr = r.dot(r)
        p = r + (new_rdotr / rdotr) * p
        rdotr = new_rdotr
    return x


def hvp_exact(kl_fn: Closure, params: Sequence[Tensor], damping: float = 1e-5) -> HVP:
    """``v -> H v + damping v`` for the Hessian of ``kl_fn`` at ``params`` (double backward)."""
    leaves = _leaves(params)
    flat_grad = flatten(_grads(kl_fn(leaves), leaves, create_graph=True))

    def hvp(v: Tensor) -> Tensor:
        gv = flat_grad.dot(v.to(flat_grad.dtype))
        return flatten(_grads(gv, leaves)).detach() + damping * v

    return hvp


def hvp_finite_difference(
    kl_fn: Closure,
    params: Sequence[Tensor],
    damping: float = 1e-5,
    base_eps: float = 1.0,
    symmetric: bool = True,
) -> HVP:
    """``v -> (g(theta + r v) - g(theta - r v)) / 2r + damping v`` (rllab's FiniteDifferenceHvp).

    ``g`` is the gradient of ``kl_fn`` and ``r = base_eps / (||theta|| + 1e-8)``;
    ``symmetric=False`` uses the forward difference ``(g(theta + r v) - g(theta)) / r``.
    """
    theta = [p.detach() for p in params]
    r = base_eps / (float(flatten(theta).norm()) + 1e-8)

    def grad_at(ps: Sequence[Tensor]) -> Tensor:
        leaves = _leaves(ps)
        return flatten(_grads(kl_fn(leaves), leaves)).detach()

    g0 = None if symmetric else grad_at(theta)

    def hvp(v: Tensor) -> Tensor:
        vs = unflatten(v, theta)
        plus = grad_at([t + r * u for t, u in zip(theta, vs, strict=True)])
        if symmetric:
            minus = grad_at([t - r * u for t, u in zip(theta, vs, strict=True)])
            hv = (plus - minus) / (2.0 * r)
        else:
            assert g0 is not None
            hv = (plus - g0) / r
        return hv + damping * v

    return hvp


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
        cand = _leaves([t + frac * s.detach() for t, s in zip(theta, steps, strict=True)])
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


def trpo_step(
    loss_fn: Closure,
    kl_fn: Closure,
    params: Sequence[Tensor],
    max_kl: float = 0.01,
    damping: float = 1e-5,
    cg_iters: int = 10,
    backtrack_ratio: float = 0.8,
    max_backtracks: int = 15,
    hvp: Literal["exact", "finite_difference"] = "exact",
    fd_base_eps: float = 1.0,
    evaluate: Callable[[Sequence[Tensor]], tuple[float, float]] | None = None,
) -> TRPOStepResult:
    """One TRPO update of ``params`` minimising ``loss_fn`` subject to ``kl_fn <= max_kl``.

    ``evaluate(theta) -> (loss, kl)`` scores line-search candidates (default: ``loss_fn``
    and ``kl_fn``); pass a cheaper one that needs no gradient graph when there is one.

    ``kl_fn(theta)`` must be the KL between the fixed old policy and the policy at
    ``theta`` (zero, with zero gradient, at ``params``).
    """
    leaves = _leaves(params)
    loss = loss_fn(leaves)
    g = flatten(_grads(loss, leaves)).detach()
    loss_before = _item(loss)
    del loss  # frees the loss graph before the Hessian-vector products
    if hvp == "exact":
        avp = hvp_exact(kl_fn, leaves, damping)
    elif hvp == "finite_difference":
        avp = hvp_finite_difference(kl_fn, leaves, damping, base_eps=fd_base_eps)
    else:
        raise ValueError(f"hvp must be 'exact' or 'finite_difference', got {hvp!r}")
    direction = conjugate_gradient(avp, g, iters=cg_iters)
    shs = float(direction.dot(avp(direction)))
    scale = math.sqrt(2.0 * max_kl / (shs + 1e-8)) if shs + 1e-8 > 0 else math.nan
    if math.isnan(scale):
        scale = 1.0
    result = line_search(
        evaluate or (lambda cand: (loss_fn(cand), kl_fn(cand))),
        leaves,
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
