"""Reptile (Nichol, Achiam, Schulman, 2018, "On First-Order Meta-Learning Algorithms").

Each task's parameters take ``inner_steps`` full-batch steps on its support set from
``theta`` (no graph through them), and the meta-gradient is ``theta - mean_t phi_t``: with
SGD at rate ``eps`` the outer step is the paper's ``theta += eps (mean_t phi_t - theta)``,
with Adam its Adam variant. The query sets only give the reported loss and predictions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..core import MAML
from ..core.adapt import adapt, outer_loss, support_loss
from ..core.executors import batched_adapt, check_batch, tasks
from ..core.functional import LossFn
from ..core.spec import Hyper, Params
from .common import add_to_grad, refuse


class Reptile(MAML):
    """``meta_backward`` accumulates ``theta - mean_t phi_t`` into ``.grad``; the tasks'
    adaptations run under ``vmap`` where the float64 check allows, else one by one.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> import metagrad as mg
        >>> model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> reptile = mg.Reptile(model, F.mse_loss, inner_lr=0.01, inner_steps=5)
        >>> opt = torch.optim.SGD(reptile.parameters(), lr=0.1)  # the outer step size
        >>> g = torch.Generator().manual_seed(0)
        >>> sx, sy, qx, qy = mg.tasks.SinusoidTasks().sample(4, 10, 1, g).tensors()
        >>> loss = reptile.meta_backward(sx, sy, qx, qy)  # .grad = theta - mean of the phis
        >>> opt.step()
    """

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, inner_lr: float = 0.001, inner_steps: int = 5,
        **kwargs: Any,
    ) -> None:  # fmt: skip
        keys = ("learn_lr", "step_weights", "first_order", "compile")
        refuse("Reptile", kwargs, keys, "its meta-gradient is first order")
        if inner_steps < 1:
            raise ValueError(f"Reptile needs inner_steps >= 1, got {inner_steps}")
        super().__init__(model, loss_fn, inner_lr, inner_steps, first_order=True, **kwargs)

    def adapted(self, support_x: Tensor, support_y: Tensor) -> Params:
        """Every task's adapted parameters ``{name: [tasks, ...]}`` (detached)."""
        data = (support_x, support_y, support_x, support_y)
        problem, hyper = self.problem(), self.hyper()
        params = {k: v.detach() for k, v in self._params().items()}
        if self.strategy(data, steps=self.inner_steps, first_order=True).vectorize is False:
            fast = [
                adapt(
                    support_loss(self.model, self.loss_fn, problem.buffers, x, y),
                    params,
                    problem.spec,
                    hyper,
                    autograd=True,
                )  # fmt: skip
                for x, y, _, _ in tasks(data)
            ]
            return {k: torch.stack([f[k] for f in fast]).detach() for k in self.adapts}  # type: ignore[index]
        last = batched_adapt(problem, params, hyper, support_x, support_y)[-1]
        return {k: last[k].detach() for k in self.adapts}

    def meta_loss(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "Reptile's meta-gradient is not the gradient of a loss: call meta_backward(...) "
            "and step the optimizer"
        )

    def meta_backward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                      *, return_outputs: bool = False) -> Tensor | tuple[Tensor, Tensor]:  # fmt: skip
        """Accumulate ``theta - mean_t phi_t`` into ``.grad`` of the adapting parameters;
        return the mean query loss after adaptation (and the query predictions)."""
        check_batch(support_x, support_y, query_x, query_y)
        fast = self.adapted(support_x, support_y)
        params = self._params()
        add_to_grad(params, {k: params[k].detach() - fast[k].mean(0) for k in self.adapts})
        with torch.no_grad():
            buffers, plain = dict(self.model.named_buffers()), Hyper({}, None)
            losses, outs = [], []
            for t, (qx, qy) in enumerate(zip(query_x, query_y, strict=True)):
                phi = params | {k: v[t] for k, v in fast.items()}
                loss, out = outer_loss(self.model, self.loss_fn, buffers, [phi], qx, qy, plain)
                losses.append(loss)
                outs.append(out)
        loss = torch.stack(losses).mean()
        return (loss, torch.stack(outs)) if return_outputs else loss
