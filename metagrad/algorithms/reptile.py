"""Reptile (Nichol, Achiam, Schulman, 2018, "On First-Order Meta-Learning Algorithms").

Each task's parameters take ``inner_steps`` steps on its support set from ``theta`` (no
graph through them), and the meta-gradient is ``theta - mean_t phi_t``: with SGD at rate
``eps`` the outer step is the paper's ``theta += eps (mean_t phi_t - theta)``, with Adam its
Adam variant. The query sets only give the reported loss and predictions.

With ``carry_inner_state`` the inner Adam's moments and step count carry over from task to
task and from meta-iteration to meta-iteration (buffers of the learner, so checkpoints hold
them), as in the paper's code, where one TensorFlow Adam serves every task; adaptation at
test time starts from them too and leaves them as they are. Otherwise each task starts
from zero moments, so its first step moves every adapting weight by ``inner_lr`` (Adam's
first step is the gradient's sign).

The steps are full-batch, or with ``inner_batch`` take successive mini-batches of the
support set, shuffled anew at each pass over it, as the paper's experiments do. It matters:
k steps on one batch give, to second order, the gradient of that batch's loss and of its
squared gradient norm (joint training), while steps on different mini-batches add the
term that rewards gradients of one task's batches agreeing (the paper's section 5).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..core import MAML
from ..core.adapt import Loss, adapt, outer_loss, support_loss
from ..core.executors import batched_adapt, check_batch, tasks
from ..core.functional import LossFn
from ..core.inner import Adam, State
from ..core.spec import Hyper, Params, Spec
from .common import add_to_grad, refuse


@dataclass(frozen=True, eq=False)
class CarriedAdam(Adam):
    """Adam that starts from moments ``start`` after ``offset`` earlier steps (zero moments
    when ``offset`` is 0), and appends each step's new state to ``sink`` when given."""

    start: State = field(default_factory=dict)
    offset: int = 0
    sink: list[State] | None = None

    def direction(self, grads: Params, state: State, step: int) -> tuple[Params, State]:
        if step == 0 and self.offset > 0:
            state = self.start
        out, new = super().direction(grads, state, self.offset + step)
        if self.sink is not None:
            self.sink.append(new)
        return out, new


def minibatch_order(
    size: int, batch: int, steps: int, generator: torch.Generator | None = None
) -> Tensor:
    """The support indices of ``steps`` mini-batches ``[steps, batch]``: passes over
    ``0..size-1``, each in a fresh random order, cut into consecutive batches (a batch may
    span two passes)."""
    passes = -(-steps * batch // size)
    order = torch.cat([torch.randperm(size, generator=generator) for _ in range(passes)])
    return order[: steps * batch].view(steps, batch)


def minibatch_loss(model: nn.Module, loss_fn: LossFn, buffers: Params, x: Tensor, y: Tensor,
                   order: Tensor, stepwise: bool) -> Loss:  # fmt: skip
    """The inner loss of step ``k`` on mini-batch ``order[k]``: ``(params, k) -> loss``."""
    order = order.to(x.device)
    batches = [support_loss(model, loss_fn, buffers, x[idx], y[idx]) for idx in order]

    def loss(p: Params, k: int) -> Tensor:  # type: ignore[override]
        return batches[k](p, k) if stepwise else batches[k](p)

    return loss  # type: ignore[return-value]


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
        *, inner_batch: int | None = None, carry_inner_state: bool = False, **kwargs: Any,
    ) -> None:  # fmt: skip
        keys = ("learn_lr", "step_weights", "first_order", "compile")
        refuse("Reptile", kwargs, keys, "its meta-gradient is first order")
        if inner_steps < 1:
            raise ValueError(f"Reptile needs inner_steps >= 1, got {inner_steps}")
        if inner_batch is not None and (isinstance(inner_batch, bool) or inner_batch < 1):
            raise ValueError(f"inner_batch must be a positive number of examples, got {inner_batch!r}")  # fmt: skip
        super().__init__(model, loss_fn, inner_lr, inner_steps, first_order=True, **kwargs)
        self.inner_batch = inner_batch
        self.carry_inner_state = bool(carry_inner_state)
        if self.carry_inner_state:
            if not isinstance(self.inner_optimizer, Adam):
                raise ValueError(f"carry_inner_state needs an Adam inner optimizer (inner_optimizer=adam), got {self.inner_optimizer!r}")  # fmt: skip
            params = self._params()
            for n in self.adapts:  # Adam's moments m and v of each adapting parameter
                for moment in ("m", "v"):
                    self.register_buffer(f"inner_{moment}/{n.replace('.', '/')}", torch.zeros_like(params[n]).detach())  # fmt: skip
            self.register_buffer("inner_step_count", torch.zeros((), dtype=torch.long))

    def carried_state(self) -> State:
        """The carried inner Adam state ``{name: (m, v)}`` (``carry_inner_state``)."""
        bufs = dict(self.named_buffers())
        return {n: (bufs[f"inner_m/{n.replace('.', '/')}"], bufs[f"inner_v/{n.replace('.', '/')}"]) for n in self.adapts}  # fmt: skip

    def spec(self, steps: int | None = None, first_order: bool | None = None) -> Spec:
        spec = super().spec(steps, first_order)
        if not getattr(self, "carry_inner_state", False):  # (MAML's __init__ asks too)
            return spec
        rule = self.inner_optimizer
        assert isinstance(rule, Adam)
        carried = CarriedAdam(rule.betas, rule.eps, start=self.carried_state(), offset=int(self.inner_step_count))  # fmt: skip
        return replace(spec, rule=carried)

    def adapted(self, support_x: Tensor, support_y: Tensor) -> Params:
        """Every task's adapted parameters ``{name: [tasks, ...]}`` (detached). With
        ``inner_batch``, the mini-batches are drawn from torch's global generator."""
        data = (support_x, support_y, support_x, support_y)
        problem, hyper = self.problem(), self.hyper()
        params = {k: v.detach() for k, v in self._params().items()}
        one_by_one = self.inner_batch is not None or self.carry_inner_state
        if one_by_one or self.strategy(data, steps=self.inner_steps, first_order=True).vectorize is False:  # fmt: skip
            return self._adapted_one_by_one(problem.spec, problem.buffers, hyper, params, data)
        last = batched_adapt(problem, params, hyper, support_x, support_y)[-1]
        return {k: last[k].detach() for k in self.adapts}

    def _adapted_one_by_one(self, spec: Spec, buffers: Params, hyper: Hyper, params: Params,
                            data: tuple[Tensor, Tensor, Tensor, Tensor]) -> Params:  # fmt: skip
        """The tasks in order: full-batch or mini-batched steps, and the carried state passed
        from each task to the next (then kept for the next meta-iteration)."""
        size = data[0].shape[1]
        if self.inner_batch is not None and self.inner_batch > size:
            raise ValueError(f"inner_batch={self.inner_batch} exceeds the {size} examples of a support set")  # fmt: skip
        fast: list[Params] = []
        sink: list[State] = []  # the carried rule's state after each step
        if isinstance(spec.rule, CarriedAdam):
            spec = replace(spec, rule=replace(spec.rule, sink=sink))
        for x, y, _, _ in tasks(data):
            if self.inner_batch is None:
                phi = adapt(support_loss(self.model, self.loss_fn, buffers, x, y), params, spec, hyper, autograd=True)  # fmt: skip
            else:
                order = minibatch_order(size, self.inner_batch, self.inner_steps)
                loss = minibatch_loss(self.model, self.loss_fn, buffers, x, y, order, spec.stepwise)
                phi = adapt(loss, params, spec, hyper, autograd=True, loss_takes_step=True)
            assert isinstance(phi, dict)
            fast.append(phi)
            if isinstance(spec.rule, CarriedAdam):  # the next task starts where this one ended
                spec = replace(spec, rule=replace(spec.rule, start=sink[-1], offset=spec.rule.offset + self.inner_steps))  # fmt: skip
        if isinstance(spec.rule, CarriedAdam):
            with torch.no_grad():
                for n, (mb, vb) in self.carried_state().items():
                    m, v = spec.rule.start[n]
                    mb.copy_(m)
                    vb.copy_(v)
                self.inner_step_count.fill_(spec.rule.offset)
        return {k: torch.stack([f[k] for f in fast]).detach() for k in self.adapts}

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
