"""The inner loop as a pure function, and the one per-task function every executor runs.

:func:`adapt` takes any scalar loss of a parameter dict (a supervised support loss, a
policy-gradient surrogate on sampled paths, ...), so supervised MAML and meta-RL share it.
Because ``torch.func`` transforms compose with autograd, the adapted parameters stay
differentiable with respect to the initial ones (and the learned rates); ``first_order``
detaches the inner gradients. ``autograd=True`` takes the inner gradient from
``torch.autograd.grad`` instead of ``torch.func.grad``: the same numbers, a few percent
faster per meta-iteration for conv nets on CPU, valid only outside ``torch.func``
transforms; it also works on parameters with a leading task dimension whose loss is a sum
over tasks (row ``i`` of the gradient is task ``i``'s), which is how meta-RL batches tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import grad

from .functional import LossFn, forward, to_channels_last
from .inner import State
from .recompute import recomputed
from .spec import Hyper, Params, Spec

Loss = Callable[[Params], Tensor]  # with a stepwise spec: (params, step) -> loss


class Adapted:
    """A model bound to task-adapted ("fast") parameters; call it like the model."""

    def __init__(self, model: nn.Module, params: Params, buffers: Params,
                 step: int | None = None) -> None:  # fmt: skip
        self.model = model
        self.params = params
        self.buffers = buffers
        self.step = step  # the inner step index a per-step model runs at (stepwise specs)

    def __call__(self, x: Tensor) -> Tensor:
        return forward(self.model, self.params, self.buffers, x, self.step)

    def named_parameters(self) -> list[tuple[str, Tensor]]:
        return list(self.params.items())


def _inner_grads(loss: Loss, params: Params, names: tuple[str, ...], create: bool,
                 autograd: bool) -> Params:  # fmt: skip
    if autograd:
        # a parameter that does not require grad (selected but frozen, or evaluation under
        # no_grad) is differentiated through a detached copy: it adapts, and carries no
        # meta-gradient of its own
        inputs = {k: p if p.requires_grad else p.detach().requires_grad_() for k, p in params.items()
                  if k in names}  # fmt: skip
        with torch.enable_grad():
            out = loss(params | inputs)
            gs = torch.autograd.grad(
                out, list(inputs.values()), create_graph=create,
                allow_unused=True, materialize_grads=True,  # zeros for unused, as torch.func
            )  # fmt: skip
        return dict(zip(inputs, gs, strict=True))
    fixed = {k: p for k, p in params.items() if k not in names}
    grads = grad(lambda a: loss(fixed | a))({k: params[k] for k in names})
    return grads if create else {k: g.detach() for k, g in grads.items()}


def adapt(
    loss: Loss,
    params: Params,
    spec: Spec,
    hyper: Hyper,
    *,
    steps: int | None = None,
    lr: float | None = None,
    first_order: bool | None = None,
    autograd: bool = False,
    every_step: bool = False,
    loss_takes_step: bool = False,
) -> Params | list[Params]:
    """``spec.steps`` (or ``steps``) inner steps on ``loss`` from ``params``.

    Only ``spec.adapts`` change; the others stay the same tensors. ``lr`` overrides a fixed
    rate (evaluation step sizes); learned rates always come from ``hyper``. Returns the
    adapted parameters, or with ``every_step`` the list after each step. ``loss`` is called
    as ``loss(params, k)`` at step ``k`` with a stepwise spec or ``loss_takes_step`` (inner
    steps on mini-batches), else ``loss(params)``.

    Example (any scalar loss of a parameter dict; a learner provides the spec):
        >>> import torch, torch.nn.functional as F
        >>> import metagrad as mg
        >>> from metagrad.core import adapt, forward
        >>> model = torch.nn.Linear(1, 1)
        >>> maml = mg.MAML(model, F.mse_loss, inner_lr=0.1)
        >>> x = torch.linspace(-1, 1, 8).view(-1, 1)
        >>> loss = lambda p: F.mse_loss(forward(model, p, {}, x), 3 * x)
        >>> params = dict(model.named_parameters())
        >>> fast = adapt(loss, params, maml.spec(), maml.hyper(), steps=20)
        >>> bool(loss(fast) < loss(params))  # fast is differentiable w.r.t. params
        True
    """
    steps = spec.steps if steps is None else steps
    first_order = spec.first_order if first_order is None else first_order
    create = not first_order and (torch.is_grad_enabled() or not autograd)
    names = spec.adapts
    state = spec.rule.init({k: params[k] for k in names})
    trail: list[Params] = []

    def step(params: Params, state: State, k: int, hyper: Hyper, create: bool) -> tuple[Params, State]:  # fmt: skip
        at_k: Loss = (lambda p: loss(p, k)) if spec.stepwise or loss_takes_step else loss  # type: ignore[call-arg]
        grads = _inner_grads(at_k, params, names, create, autograd)
        direction, state = spec.rule.direction(grads, state, k)
        params = dict(params)
        for n in names:
            rate = spec.rate(n, k, hyper) if lr is None or spec.learn_lr else lr
            params[n] = params[n] - rate * direction[n]
        return params, state

    for k in range(steps):
        if spec.checkpoint and create and autograd:  # the step's graph rebuilt in backward
            params, state = _checkpointed(step, names, params, state, k, hyper)
        else:
            params, state = step(params, state, k, hyper, create)
        if every_step:
            trail.append(params)
    return trail if every_step else params


def _checkpointed(step: Callable[..., tuple[Params, State]], names: tuple[str, ...], params: Params,
                  state: State, k: int, hyper: Hyper) -> tuple[Params, State]:  # fmt: skip
    """``step`` through :func:`~.recompute.recomputed`: its inputs flattened (parameters,
    rule state, learned rates), its outputs (adapted parameters, new state) unflattened."""
    pnames, rnames = list(params), list(hyper.rates)
    shape = [(n, len(v)) for n, v in state.items()]
    out_shape: list[tuple[str, int]] = []

    def unflatten_state(flat: Sequence[Tensor], layout: list[tuple[str, int]]) -> State:
        out, i = {}, 0
        for n, m in layout:
            out[n], i = tuple(flat[i : i + m]), i + m
        return out

    def fn(flat: Sequence[Tensor], create: bool) -> list[Tensor]:
        n_p, n_s = len(pnames), sum(m for _, m in shape)
        p = dict(zip(pnames, flat[:n_p], strict=True))
        st = unflatten_state(flat[n_p : n_p + n_s], shape)
        r = dict(zip(rnames, flat[n_p + n_s :], strict=True))
        new_p, new_s = step(p, st, k, Hyper(r, hyper.weights), create)
        out_shape[:] = [(n, len(v)) for n, v in new_s.items()]
        return [*(new_p[n] for n in names), *(t for v in new_s.values() for t in v)]

    flat = [*params.values(), *(t for v in state.values() for t in v), *hyper.rates.values()]
    out = recomputed(fn, flat)
    adapted = dict(params) | dict(zip(names, out[: len(names)], strict=True))
    return adapted, unflatten_state(out[len(names) :], out_shape)


def support_loss(model: nn.Module, loss_fn: LossFn, buffers: Params, x: Tensor, y: Tensor) -> Loss:
    """The supervised inner loss ``params -> loss_fn(model(x), y)`` (``(params, step)`` for
    a per-step model)."""

    def loss(p: Params, step: int | None = None) -> Tensor:
        return loss_fn(forward(model, p, buffers, x, step), y)

    return loss


def outer_loss(
    model: nn.Module,
    loss_fn: LossFn,
    buffers: Params,
    adapted: list[Params],
    qx: Tensor,
    qy: Tensor,
    hyper: Hyper,
    *,
    channels_last: bool = False,
    stepwise: bool = False,
    first: int = 0,
) -> tuple[Tensor, Tensor]:
    """The query loss the outer loop sees, from the parameters after each step (the last
    entry alone without multi-step weights, or with weights for another step count: evaluation
    at more or fewer steps than trained), and the last step's predictions. ``stepwise``: the
    query pass after step ``k`` runs the model at step ``k`` (``adapted[0]`` is step ``first``)."""
    if hyper.weights is not None and len(adapted) != hyper.weights.shape[0]:
        hyper = Hyper(hyper.rates, None)
    if hyper.weights is None:
        first, adapted = first + len(adapted) - 1, adapted[-1:]
    total: Tensor | None = None
    out: Tensor | None = None
    for i, p in enumerate(adapted):
        x = qx
        if channels_last:
            p, x = to_channels_last(p, qx)
        out = forward(model, p, buffers, x, first + i if stepwise else None)
        term = loss_fn(out, qy)
        if hyper.weights is not None:
            term = hyper.weights[i].to(term.dtype) * term
        total = term if total is None else total + term
    assert total is not None and out is not None
    return total, out


def task_loss(
    model: nn.Module,
    loss_fn: LossFn,
    spec: Spec,
    hyper: Hyper,
    params: Params,
    buffers: Params,
    sx: Tensor,
    sy: Tensor,
    qx: Tensor,
    qy: Tensor,
    *,
    steps: int | None = None,
    autograd: bool = False,
    channels_last: bool = False,
) -> tuple[Tensor, Tensor]:
    """One task: adapt on ``(sx, sy)``, then the outer loss and predictions on ``(qx, qy)``."""
    steps = spec.steps if steps is None else steps
    if steps == 0:
        adapted = [params]
    else:
        trail = adapt(support_loss(model, loss_fn, buffers, sx, sy), params, spec, hyper,
                      steps=steps, autograd=autograd, every_step=True)  # fmt: skip
        assert isinstance(trail, list)
        adapted = trail
    return outer_loss(model, loss_fn, buffers, adapted, qx, qy, hyper, channels_last=channels_last,
                      stepwise=spec.stepwise)  # fmt: skip


def curve(
    model: nn.Module,
    loss_fn: LossFn,
    spec: Spec,
    hyper: Hyper,
    params: Params,
    buffers: Params,
    task: tuple[Tensor, Tensor, Tensor, Tensor],
    metrics: list[Callable[[Tensor, Tensor], Tensor]],
    lr: float | None = None,
    channels_last: bool = False,
) -> Tensor:
    """Metrics on one task's query set after 0..``spec.steps`` steps: ``[metrics, steps+1]``.

    The query passes build no graph (metrics only); ``channels_last`` runs them in that
    memory format, as :func:`outer_loss` does."""
    sx, sy, qx, qy = task
    trail = adapt(support_loss(model, loss_fn, buffers, sx, sy), params, spec, hyper, lr=lr, every_step=True)  # fmt: skip
    assert isinstance(trail, list)
    rows = []
    with torch.no_grad():
        for i, p in enumerate([params, *trail]):  # before any step: step 0's layers
            x = qx
            if channels_last:
                p, x = to_channels_last(p, qx)
            out = forward(model, p, buffers, x, max(i - 1, 0) if spec.stepwise else None)
            rows.append(torch.stack([m(out, qy) for m in metrics]))
    return torch.stack(rows, dim=-1)
