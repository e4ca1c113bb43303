"""Gradient checkpointing of one inner step: keep its inputs, not its graph.

The forward pass computes the step's values only (a first-order inner gradient, no graph);
the backward pass rebuilds the step's second-order graph from the saved inputs, takes the
vector-Jacobian product, and frees it before the previous step is rebuilt. Memory is one
step's graph plus every step's inputs (parameters, rule state, learned rates), instead of
every step's graph; the cost is one more first-order pass per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

# fn(tensors, create) -> outputs: one step as a function of its flat inputs; ``create``
# builds the second-order graph (backward) or computes values only (forward)
StepFn = Callable[[Sequence[Tensor], bool], list[Tensor]]


class _Recomputed(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, fn: StepFn, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.fn = fn
        ctx.save_for_backward(*tensors)
        with torch.enable_grad():
            out = fn([t.detach() for t in tensors], False)
        return tuple(o.detach() for o in out)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        need = ctx.needs_input_grad[1:]
        leaves = [
            t.detach().requires_grad_(n) for t, n in zip(ctx.saved_tensors, need, strict=True)
        ]
        with torch.enable_grad():
            out = ctx.fn(leaves, True)
        pairs = [
            (o, g) for o, g in zip(out, grads, strict=True) if g is not None and o.requires_grad
        ]
        wanted = [leaf for leaf, n in zip(leaves, need, strict=True) if n]
        got = iter(
            torch.autograd.grad(
                [o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True
            )
            if pairs and wanted
            else [None] * len(wanted)
        )
        return (None, *[next(got) if n else None for n in need])


def recomputed(fn: StepFn, tensors: Sequence[Tensor]) -> list[Tensor]:
    """``fn(tensors, True)``'s values, with its graph rebuilt in the backward pass."""
    return list(_Recomputed.apply(fn, *tensors))
