"""iMAML, implicit MAML (Rajeswaran, Finn, Kakade, Levine, NeurIPS 2019).

Each task solves the proximally regularised inner problem

    phi_t = argmin_phi  L_support(phi) + lam/2 |phi - theta|^2

approximately, by ``inner_steps`` steps of the update rule from ``phi = theta`` (no graph
through them), and the meta-gradient is the implicit one,

    mean_t (I + H_t / lam)^-1 grad L_query(phi_t),   H_t the support loss's Hessian at phi_t,

solved by ``cg_steps`` of conjugate gradient with Hessian-vector products (the core's
:mod:`~metagrad.core.linalg`, shared with TRPO). Memory does not grow with the inner steps.
Tasks run one by one (autograd, double backward), or all at once under ``vmap``
(``torch.func``) where that is exact for the model: checked
once in float64 against the loop, as MAML's strategies are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, vjp, vmap

from ..core import MAML, linalg
from ..core.adapt import adapt, support_loss
from ..core.executors import Data, check_batch, tasks
from ..core.functional import LossFn, forward, plain_norms
from ..core.spec import Hyper, Params, Spec
from ..core.strategy import as_double, float64_copy
from .common import add_to_grad, refuse


class iMAML(MAML):  # noqa: N801  (the paper's name)
    """``meta_backward`` accumulates the implicit meta-gradient into ``.grad`` of the model's
    parameters (all of them adapt). ``vectorize``: ``None`` (vmap where exact and expected
    faster: small dense models on CPU, any model on CUDA), ``True`` or ``False``.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> import metagrad as mg
        >>> model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> imaml = mg.iMAML(model, F.mse_loss, inner_lr=0.01, inner_steps=10, lam=1.0, cg_steps=5)
        >>> opt = torch.optim.Adam(imaml.parameters(), lr=1e-3)
        >>> g = torch.Generator().manual_seed(0)
        >>> sx, sy, qx, qy = mg.tasks.SinusoidTasks().sample(4, 10, 10, g).tensors()
        >>> loss = imaml.meta_backward(sx, sy, qx, qy)  # fills .grad: no graph through the steps
        >>> model[0].weight.grad is not None
        True
        >>> opt.step()
    """

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, inner_lr: float = 0.1, inner_steps: int = 16,
        lam: float = 2.0, cg_steps: int = 5, **kwargs: Any,
    ) -> None:  # fmt: skip
        keys = ("learn_lr", "step_weights", "first_order", "compile", "adapt")
        refuse("iMAML", kwargs, keys, "its meta-gradient is implicit")
        if not lam > 0:
            raise ValueError(f"iMAML needs lam > 0 (the proximal strength), got {lam}")
        if cg_steps < 1:
            raise ValueError(f"iMAML needs cg_steps >= 1, got {cg_steps}")
        if inner_steps < 1:
            raise ValueError(f"iMAML needs inner_steps >= 1, got {inner_steps}")
        if kwargs.get("vectorize") not in (None, True, False):
            raise ValueError("iMAML's vectorize must be None, True or False")
        super().__init__(model, loss_fn, inner_lr, inner_steps, first_order=True, **kwargs)
        if self.spec().stepwise:
            raise ValueError("iMAML's inner problem has no step index: use a model whose "
                             "forward does not take step= (no per-step layers)")  # fmt: skip
        self.lam, self.cg_steps = float(lam), int(cg_steps)
        self._batched: dict[tuple, bool] = {}

    def meta_loss(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "iMAML's meta-gradient is implicit, not the gradient of a loss graph: call "
            "meta_backward(...) and step the optimizer"
        )

    def _args(self) -> tuple[nn.Module, LossFn, Spec, Hyper, float, int]:
        return self.model, self.loss_fn, self.spec(), self.hyper(), self.lam, self.cg_steps

    def solve(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """One task's inner solution ``phi`` (detached) from the current parameters."""
        params = {k: v.detach() for k, v in self.model.named_parameters()}
        return _solve(*self._args()[:5], params, dict(self.model.named_buffers()), x, y, True)

    def implicit_grad(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Params, Tensor, Tensor]:  # fmt: skip
        """One task's implicit meta-gradient ``(I + H/lam)^-1 grad L_query(phi)`` (one
        tensor per parameter), its query loss and predictions."""
        params = {k: v.detach() for k, v in self.model.named_parameters()}
        return _one_task(*self._args(), params, dict(self.model.named_buffers()), (sx, sy, qx, qy))

    def batched(self, data: Data) -> bool:
        """Whether this batch's tasks run under vmap (decided once per device and dtype)."""
        key = (data[0].device.type, data[0].dtype)
        if key not in self._batched:
            ok = (
                self.vectorize is not False
                and self.strategy(data, steps=1, first_order=True).vectorize is True
                and _vmap_matches_loop(self, data)
            )
            if self.vectorize and not ok:
                raise ValueError("vectorize=True is not exact for this model under iMAML; "
                                 "use vectorize=False or leave it unset")  # fmt: skip
            self._batched[key] = ok
        return self._batched[key]

    def meta_backward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                      *, return_outputs: bool = False) -> Tensor | tuple[Tensor, Tensor]:  # fmt: skip
        """Accumulate the mean implicit meta-gradient into ``.grad``; return the mean query
        loss after adaptation (and the query predictions)."""
        check_batch(support_x, support_y, query_x, query_y)
        data = (support_x, support_y, query_x, query_y)
        params = dict(self.model.named_parameters())
        detached = {k: v.detach() for k, v in params.items()}
        run = _all_tasks_vmapped if self.batched(data) else _all_tasks_looped
        grads, losses, outs = run(*self._args(), detached, dict(self.model.named_buffers()), data)
        add_to_grad(params, {k: g.mean(0) for k, g in grads.items()})
        loss = losses.mean()
        return (loss, outs) if return_outputs else loss


# ------------------------------------------------------------------ the per-task function
def _solve(model: nn.Module, loss_fn: LossFn, spec: Spec, hyper: Hyper, lam: float,
           params: Params, buffers: Params, x: Tensor, y: Tensor, autograd: bool) -> Params:  # fmt: skip
    fit = support_loss(model, loss_fn, buffers, x, y)

    def proximal(p: Params) -> Tensor:
        return fit(p) + 0.5 * lam * sum(((p[k] - params[k]) ** 2).sum() for k in spec.adapts)

    phi = adapt(proximal, params, spec, hyper, autograd=autograd)
    assert isinstance(phi, dict)
    return {k: v.detach() for k, v in phi.items()}


def _one_task(model: nn.Module, loss_fn: LossFn, spec: Spec, hyper: Hyper, lam: float,
              cg_steps: int, params: Params, buffers: Params, task: Data) -> tuple[Params, Tensor, Tensor]:  # fmt: skip
    """Autograd (double backward) version: outside torch.func transforms."""
    sx, sy, qx, qy = task
    phi, names = (
        _solve(model, loss_fn, spec, hyper, lam, params, buffers, sx, sy, True),
        spec.adapts,
    )

    def at(ps: list[Tensor], x: Tensor) -> Tensor:
        return forward(model, phi | dict(zip(names, ps, strict=True)), buffers, x)

    with torch.enable_grad():
        xs = linalg.leaves([phi[k] for k in names])
        out = at(xs, qx)
        loss = loss_fn(out, qy)
        g = linalg.flatten(linalg.grads(loss, xs)).detach()
        # (I + H/lam) v = g  <=>  (H + lam I) v = lam g, a system CG solves
        hvp = linalg.hvp_exact(lambda ps: loss_fn(at(ps, sx), sy), xs, lam)
        v = linalg.conjugate_gradient(hvp, lam * g, iters=cg_steps)
    parts = linalg.unflatten(v, xs)
    return dict(zip(names, parts, strict=True)), loss.detach(), out.detach()


def _one_task_func(model: nn.Module, loss_fn: LossFn, spec: Spec, hyper: Hyper, lam: float,
                   cg_steps: int, params: Params, buffers: Params, task: Data) -> tuple[Params, Tensor, Tensor]:  # fmt: skip
    """torch.func version (runs under vmap): Hessian-vector products by reverse over reverse,
    and the conjugate gradient without a data-dependent break (the same iterate)."""
    sx, sy, qx, qy = task
    phi, names = (
        _solve(model, loss_fn, spec, hyper, lam, params, buffers, sx, sy, False),
        spec.adapts,
    )
    fixed = {k: v for k, v in phi.items() if k not in names}
    shapes = [phi[k] for k in names]

    def support(p: Params) -> Tensor:
        return loss_fn(forward(model, fixed | p, buffers, sx), sy)

    def query(p: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        out = forward(model, fixed | p, buffers, qx)
        loss = loss_fn(out, qy)
        return loss, (loss, out)

    adapted = {k: phi[k] for k in names}
    g, (loss, out) = grad(query, has_aux=True)(adapted)

    _, pullback = vjp(grad(support), adapted)  # the gradient's graph, built once

    def hvp(v: Tensor) -> Tensor:  # H v = v^T H (H symmetric): reverse over reverse
        hv = pullback(dict(zip(names, linalg.unflatten(v, shapes), strict=True)))[0]
        return linalg.flatten([hv[k] for k in names]) + lam * v

    v = linalg.conjugate_gradient(hvp, lam * linalg.flatten([g[k] for k in names]),
                                  iters=cg_steps, masked=True)  # fmt: skip
    return dict(zip(names, linalg.unflatten(v, shapes), strict=True)), loss, out


def _all_tasks_looped(*args: Any) -> tuple[Params, Tensor, Tensor]:
    *fixed, data = args
    results = [_one_task(*fixed, task) for task in tasks(data)]
    names = list(results[0][0])
    grads = {k: torch.stack([r[0][k] for r in results]) for k in names}
    return grads, torch.stack([r[1] for r in results]), torch.stack([r[2] for r in results])


def _all_tasks_vmapped(*args: Any) -> tuple[Params, Tensor, Tensor]:
    *fixed, data = args
    model = fixed[0]
    with plain_norms(model), torch.no_grad():
        return vmap(lambda *t: _one_task_func(*fixed, t), randomness="different")(*data)


def _vmap_matches_loop(learner: iMAML, data: Data, tasks_: int = 2) -> bool:
    """Both versions on a float64 copy and the first tasks of ``data``: the same meta-gradient."""
    p64, params, buffers, h64 = float64_copy(learner.problem(), learner.hyper())
    detached = {k: v.detach() for k, v in params.items()}
    batch = tuple(as_double(t[:tasks_].detach()) for t in data)
    fixed = (p64.model, learner.loss_fn, p64.spec, h64, learner.lam, learner.cg_steps, detached, buffers)  # fmt: skip
    try:
        a, la, _ = _all_tasks_looped(*fixed, batch)
        b, lb, _ = _all_tasks_vmapped(*fixed, batch)
    except Exception:  # any failure under vmap means: do not use vmap
        return False
    scale = max([t.abs().max().item() for t in a.values()] + [1e-12])
    return torch.allclose(la, lb, rtol=1e-9, atol=1e-12) and all(
        torch.allclose(a[k], b[k], rtol=1e-7, atol=1e-9 * scale) for k in a
    )
