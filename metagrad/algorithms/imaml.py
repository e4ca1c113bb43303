"""iMAML, implicit MAML (Rajeswaran, Finn, Kakade, Levine, NeurIPS 2019).

Each task solves the proximally regularised inner problem

    phi_t = argmin_phi  L_support(phi) + lam/2 |phi - theta|^2

approximately, by ``inner_steps`` steps of the update rule from ``phi = theta`` (no graph
through them), and the meta-gradient is the implicit one,

    mean_t (I + H_t / lam)^-1 grad L_query(phi_t),   H_t the support loss's Hessian at phi_t,

solved by ``cg_steps`` of conjugate gradient with Hessian-vector products (the core's
:mod:`~metagrad.core.linalg`, shared with TRPO). Memory does not grow with the inner steps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..core import MAML, linalg
from ..core.adapt import adapt, support_loss
from ..core.executors import check_batch, tasks
from ..core.functional import LossFn, forward
from .common import add_to_grad, refuse


class iMAML(MAML):  # noqa: N801  (the paper's name)
    """``meta_backward`` accumulates the implicit meta-gradient into ``.grad`` of the model's
    parameters (all of them adapt); tasks run one by one (each has its own linear system)."""

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
        kwargs["vectorize"] = False if kwargs.get("vectorize") is None else kwargs["vectorize"]
        if kwargs["vectorize"] is not False:
            raise ValueError("iMAML runs its tasks one by one: vectorize must be None or False")
        super().__init__(model, loss_fn, inner_lr, inner_steps, first_order=True, **kwargs)
        self.lam, self.cg_steps = float(lam), int(cg_steps)

    def meta_loss(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "iMAML's meta-gradient is implicit, not the gradient of a loss graph: call "
            "meta_backward(...) and step the optimizer"
        )

    def solve(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """One task's inner solution ``phi`` (detached) from the current parameters."""
        params = {k: v.detach() for k, v in self.model.named_parameters()}
        buffers = dict(self.model.named_buffers())
        fit = support_loss(self.model, self.loss_fn, buffers, x, y)
        lam, theta = self.lam, params

        def proximal(p: dict[str, Tensor]) -> Tensor:
            return fit(p) + 0.5 * lam * sum(((p[k] - theta[k]) ** 2).sum() for k in self.adapts)

        phi = adapt(proximal, params, self.spec(), self.hyper(), autograd=True)
        assert isinstance(phi, dict)
        return {k: v.detach() for k, v in phi.items()}

    def implicit_grad(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
                      ) -> tuple[list[Tensor], Tensor, Tensor]:  # fmt: skip
        """One task's implicit meta-gradient ``(I + H/lam)^-1 grad L_query(phi)`` (one
        tensor per adapting parameter), its query loss and predictions."""
        phi, names = self.solve(sx, sy), self.adapts
        buffers = dict(self.model.named_buffers())

        def at(ps: list[Tensor], x: Tensor) -> Tensor:
            return forward(self.model, phi | dict(zip(names, ps, strict=True)), buffers, x)

        with torch.enable_grad():
            xs = linalg.leaves([phi[k] for k in names])
            out = at(xs, qx)
            loss = self.loss_fn(out, qy)
            g = linalg.flatten(linalg.grads(loss, xs)).detach()
            # (I + H/lam) v = g  <=>  (H + lam I) v = lam g, a system CG solves
            hvp = linalg.hvp_exact(lambda ps: self.loss_fn(at(ps, sx), sy), xs, self.lam)
            v = linalg.conjugate_gradient(hvp, self.lam * g, iters=self.cg_steps)
        return linalg.unflatten(v, xs), loss.detach(), out.detach()

    def meta_backward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                      *, return_outputs: bool = False) -> Tensor | tuple[Tensor, Tensor]:  # fmt: skip
        """Accumulate the mean implicit meta-gradient into ``.grad``; return the mean query
        loss after adaptation (and the query predictions)."""
        check_batch(support_x, support_y, query_x, query_y)
        n = support_x.shape[0]
        params = dict(self.model.named_parameters())
        total = [torch.zeros_like(params[k]) for k in self.adapts]
        losses, outs = [], []
        for task in tasks((support_x, support_y, query_x, query_y)):
            parts, loss, out = self.implicit_grad(*task)
            for acc, part in zip(total, parts, strict=True):
                acc += part / n
            losses.append(loss)
            outs.append(out)
        add_to_grad(params, dict(zip(self.adapts, total, strict=True)))
        loss = torch.stack(losses).mean()
        return (loss, torch.stack(outs)) if return_outputs else loss
