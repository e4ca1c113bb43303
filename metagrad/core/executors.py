"""Executors: ways to run the per-task function over a batch of tasks. All compute the same
per-task losses; they differ in speed and memory, and only the loop is exact for every model
(the guard in :mod:`.strategy` decides where the batched ones may run).

* :func:`loop`: one task after the other. With ``backward=True`` each task's graph is freed
  by its own backward before the next runs (peak memory of one task).
* :func:`vmapped`: all tasks at once under ``vmap``.
* :func:`support`: the inner adaptation of all tasks under ``vmap`` (small support sets),
  the query passes in a loop. With ``backward=True`` the chain rule is split at the adapted
  parameters: each task's outer loss is differentiated with respect to its (detached)
  adapted parameters, and one backward through the batched adaptation carries the stacked
  gradients to the meta-parameters.

Each returns per-task losses ``[tasks]`` and last-step query predictions ``[tasks, query,
...]``; with ``backward=True`` the mean loss's gradient has been accumulated into ``.grad``
and both are detached.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import vmap

from .adapt import adapt, outer_loss, support_loss, task_loss
from .functional import LossFn, plain_norms
from .malloc import keep_freed_memory
from .spec import Hyper, Params, Spec

Data = tuple[Tensor, Tensor, Tensor, Tensor]


@dataclass(frozen=True)
class Problem:
    """A model, its loss and an adaptation spec, with the buffers to run them on."""

    model: nn.Module
    loss_fn: LossFn
    spec: Spec
    buffers: Params

    def task(self, params: Params, hyper: Hyper, sx: Tensor, sy: Tensor, qx: Tensor,
             qy: Tensor, *, autograd: bool = False, channels_last: bool = False) -> tuple[Tensor, Tensor]:  # fmt: skip
        return task_loss(self.model, self.loss_fn, self.spec, hyper, params, self.buffers,
                         sx, sy, qx, qy, autograd=autograd, channels_last=channels_last)  # fmt: skip


def check_batch(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> None:
    """Clear errors for inputs that are not ``[tasks, shots, ...]`` batches."""
    named = {"support_x": sx, "support_y": sy, "query_x": qx, "query_y": qy}
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}; expected [tasks, shots, ...] "
                "(use MAML.adapt for a single task)"
            )
    counts = {n: t.shape[0] for n, t in named.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"task dimensions differ: {counts}; all four need the same [tasks, ...]")
    for a, b, x, y in (("support_x", "support_y", sx, sy), ("query_x", "query_y", qx, qy)):
        if x.shape[1] != y.shape[1]:
            raise ValueError(
                f"{a} {tuple(x.shape)} and {b} {tuple(y.shape)} have different "
                "numbers of examples per task"
            )


def tasks(data: Data) -> Iterator[Data]:
    """The one task iterator: ``(sx, sy, qx, qy)`` of each task, without the task dimension."""
    return zip(*data, strict=True)


def _collect(losses: list[Tensor], outs: list[Tensor]) -> tuple[Tensor, Tensor]:
    return torch.stack(losses), torch.stack(outs)


def loop(problem: Problem, params: Params, hyper: Hyper, data: Data, *, backward: bool = False,
         channels_last: bool = False, autograd: bool | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``autograd``: inner gradients from ``torch.autograd.grad`` (default: where grad mode
    is on; must be False inside ``torch.func`` transforms)."""
    autograd = torch.is_grad_enabled() if autograd is None else autograd
    n = data[0].shape[0]
    if backward and data[0].device.type == "cpu":
        keep_freed_memory()  # each task frees its graph: keep that memory for the next
    losses, outs = [], []
    for task in tasks(data):
        loss, out = problem.task(
            params, hyper, *task, autograd=autograd, channels_last=channels_last
        )
        if backward:
            (loss / n).backward()
            loss, out = loss.detach(), out.detach()
        losses.append(loss)
        outs.append(out)
    return _collect(losses, outs)


def vmapped(problem: Problem, params: Params, hyper: Hyper, data: Data, *,
            backward: bool = False) -> tuple[Tensor, Tensor]:  # fmt: skip
    with plain_norms(problem.model):
        losses, outs = vmap(lambda *t: problem.task(params, hyper, *t), randomness="different")(
            *data
        )
    if backward:
        losses.mean().backward()
        return losses.detach(), outs.detach()
    return losses, outs


def batched_adapt(problem: Problem, params: Params, hyper: Hyper, support_x: Tensor,
                  support_y: Tensor) -> list[Params]:  # fmt: skip
    """Every task's parameters after each inner step, ``[tasks, ...]`` each, with ``vmap``."""
    p, spec = problem, problem.spec

    def one(x: Tensor, y: Tensor) -> list[Params]:
        out = adapt(support_loss(p.model, p.loss_fn, p.buffers, x, y), params, spec, hyper,
                    every_step=True)  # fmt: skip
        assert isinstance(out, list)
        return out

    with plain_norms(problem.model):
        return vmap(one, randomness="different")(support_x, support_y)


def support(problem: Problem, params: Params, hyper: Hyper, data: Data, *, backward: bool = False,
            channels_last: bool = False) -> tuple[Tensor, Tensor]:  # fmt: skip
    sx, sy, qx, qy = data
    n = sx.shape[0]
    trail = batched_adapt(problem, params, hyper, sx, sy)
    if hyper.weights is not None and len(trail) != hyper.weights.shape[0]:
        hyper = Hyper(hyper.rates, None)  # as outer_loss: weights for another step count
    first = 0
    if hyper.weights is None:
        first, trail = len(trail) - 1, trail[-1:]
    if backward and sx.device.type == "cpu":
        keep_freed_memory()
    # adapted tensors that depend on a trainable input (frozen ones may, through others)
    live = [[k for k, v in step.items() if v.requires_grad] for step in trail] if backward else []
    grads = [{k: torch.empty_like(trail[i][k]) for k in ks} for i, ks in enumerate(live)]
    losses, outs = [], []
    for t, (qx_t, qy_t) in enumerate(zip(qx, qy, strict=True)):
        if backward:
            steps = [{k: v[t].detach().requires_grad_(k in grads[i]) for k, v in s.items()}
                     for i, s in enumerate(trail)]  # fmt: skip
        else:
            steps = [{k: v[t] for k, v in s.items()} for s in trail]
        loss, out = outer_loss(problem.model, problem.loss_fn, problem.buffers, steps, qx_t, qy_t,
                               hyper, channels_last=channels_last,
                               stepwise=problem.spec.stepwise, first=first)  # fmt: skip
        if backward:
            inputs = [steps[i][k] for i, ks in enumerate(live) for k in ks]
            if inputs:
                gs = torch.autograd.grad(
                    loss / n, inputs, allow_unused=True, materialize_grads=True
                )
                targets = [(i, k) for i, ks in enumerate(live) for k in ks]
                for (i, k), g in zip(targets, gs, strict=True):
                    grads[i][k][t] = g
            loss, out = loss.detach(), out.detach()
        losses.append(loss)
        outs.append(out)
    if backward:
        roots = [trail[i][k] for i, ks in enumerate(live) for k in ks]
        if roots:
            torch.autograd.backward(roots, [grads[i][k] for i, ks in enumerate(live) for k in ks])
    return _collect(losses, outs)


def run(problem: Problem, params: Params, hyper: Hyper, data: Data, strategy: bool | str, *,
        backward: bool = False, channels_last: bool = False,
        autograd: bool | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Run ``strategy`` (``True`` vmap, ``False`` loop, ``"support"``) on a batch."""
    if strategy == "support":
        return support(problem, params, hyper, data, backward=backward, channels_last=channels_last)
    if strategy is True:
        return vmapped(problem, params, hyper, data, backward=backward)
    if strategy is False:
        return loop(problem, params, hyper, data, backward=backward, channels_last=channels_last,
                    autograd=autograd)  # fmt: skip
    raise ValueError(f"strategy must be True, False or 'support', got {strategy!r}")
