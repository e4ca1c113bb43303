"""The functional heart of MAML: pure functions of (parameters, buffers, data).

Parameters are ``dict[str, Tensor]`` as returned by ``dict(model.named_parameters())``.
The inner loop is plain gradient descent written with :func:`torch.func.grad` and
:func:`torch.func.functional_call`; because ``torch.func`` transforms compose with
ordinary autograd, the adapted parameters stay differentiable with respect to the
initial ones, so a ``backward()`` on the query loss is the exact second-order
meta-gradient. ``first_order=True`` detaches the inner gradients (FOMAML).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


def forward(model: nn.Module, params: Params, buffers: Params, x: Tensor) -> Tensor:
    """Run ``model`` on ``x`` with the given parameters and buffers."""
    return functional_call(model, (params, buffers), (x,), strict=False)


def task_loss(
    model: nn.Module, loss_fn: LossFn, params: Params, buffers: Params, x: Tensor, y: Tensor
) -> Tensor:
    return loss_fn(forward(model, params, buffers, x), y)


def sgd_step(params: Params, grads: Params, lr: float | Params) -> Params:
    """One plain gradient-descent step; ``lr`` is a float or a per-parameter dict."""
    if isinstance(lr, dict):
        return {k: p - lr[k] * grads[k] for k, p in params.items()}
    return {k: p - lr * grads[k] for k, p in params.items()}


def adapt(
    model: nn.Module,
    loss_fn: LossFn,
    params: Params,
    buffers: Params,
    x: Tensor,
    y: Tensor,
    *,
    lr: float | Params,
    steps: int,
    first_order: bool = False,
) -> Params:
    """Adapt ``params`` to one task's support set ``(x, y)`` with ``steps`` SGD steps."""

    def loss(p: Params, b: Params) -> Tensor:
        return task_loss(model, loss_fn, p, b, x, y)

    for _ in range(steps):
        # buffers are an explicit input so that layers may update them in place
        grads = grad(loss)(params, buffers)
        if first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        params = sgd_step(params, grads, lr)
    return params


def query_loss(
    model: nn.Module,
    loss_fn: LossFn,
    params: Params,
    buffers: Params,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    *,
    lr: float | Params,
    steps: int,
    first_order: bool = False,
) -> tuple[Tensor, Tensor]:
    """Loss and predictions on one task's query set after adapting on its support set."""
    fast = adapt(
        model, loss_fn, params, buffers, support_x, support_y,
        lr=lr, steps=steps, first_order=first_order,
    )  # fmt: skip
    out = forward(model, fast, buffers, query_x)
    return loss_fn(out, query_y), out


def batched_query_loss(
    model: nn.Module,
    loss_fn: LossFn,
    params: Params,
    buffers: Params,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    *,
    lr: float | Params,
    steps: int,
    first_order: bool = False,
    vectorize: bool,
) -> tuple[Tensor, Tensor]:
    """Per-task query losses ``[tasks]`` and predictions ``[tasks, query, ...]``.

    ``vectorize=True`` maps :func:`query_loss` over the task dimension with ``vmap``;
    ``vectorize=False`` loops over tasks. Both compute the same function.
    """

    def one(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
        return query_loss(
            model, loss_fn, params, buffers, sx, sy, qx, qy,
            lr=lr, steps=steps, first_order=first_order,
        )  # fmt: skip

    if vectorize:
        return vmap(one, randomness="different")(support_x, support_y, query_x, query_y)
    losses, outs = zip(
        *(one(*t) for t in zip(support_x, support_y, query_x, query_y, strict=True)),
        strict=True,
    )
    return torch.stack(losses), torch.stack(outs)
