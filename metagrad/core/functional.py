"""Functional forward passes: parameters as dicts, ``functional_call``, and the layout and
normalisation helpers that keep them fast and exact.

Parameters are ``dict[str, Tensor]`` as returned by ``dict(model.named_parameters())``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn import functional as nnf
from torch.overrides import TorchFunctionMode

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


def forward(model: nn.Module, params: Params, buffers: Params, x: Tensor,
            step: int | None = None) -> Tensor:  # fmt: skip
    """Run ``model`` on ``x`` with the given parameters and buffers (and, for a model whose
    ``forward`` takes one, the inner step index ``step``)."""
    if step is None:
        return functional_call(model, (params, buffers), (x,), strict=False)
    return functional_call(model, (params, buffers), (x,), {"step": step}, strict=False)


class _ChannelsLast(torch.autograd.Function):
    """A ``channels_last`` copy whose gradient flows back contiguous, so that only the
    pass that runs on the copy changes layout, not the backward of what produced it."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clone(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad.contiguous()


def _channels_last(t: Tensor) -> Tensor:
    if t.dim() != 4:
        return t
    if t.requires_grad and torch.is_grad_enabled():
        return _ChannelsLast.apply(t)
    # a clone, not ``contiguous``: with one channel (Omniglot images, a first conv's weight)
    # the NCHW strides already count as channels_last and ``contiguous`` keeps them, so
    # oneDNN would run the whole pass in NCHW
    return t.clone(memory_format=torch.channels_last)


def to_channels_last(params: Params, x: Tensor) -> tuple[Params, Tensor]:
    """4-D parameters and a 4-D input in ``torch.channels_last`` memory format.

    The same values (differentiable copies, whose gradients come back contiguous), another
    layout: on CPU, oneDNN runs the conv nets' query passes faster on it (Omniglot net
    ~1.2x, MiniImagenet net ~1.45x, ``benchmarks/query_floor.py``).
    """
    return {k: _channels_last(v) for k, v in params.items()}, _channels_last(x)


def _batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``F.batch_norm`` on batch statistics, written with plain tensor ops."""
    if running_mean is not None or running_var is not None:  # the strategy refuses these
        raise ValueError("BatchNorm with running statistics cannot run under vmap")
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, correction=0, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    shape = [1, -1] + [1] * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    return y if bias is None else y + bias.reshape(shape)


def _layer_norm(
    x: Tensor,
    normalized_shape: list[int] | tuple[int, ...],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """``F.layer_norm`` written with plain tensor ops."""
    dims = tuple(range(-len(normalized_shape), 0))
    mean = x.mean(dims, keepdim=True)
    y = (x - mean) * torch.rsqrt(x.var(dims, correction=0, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


class _PlainNorms(TorchFunctionMode):
    """Runs ``F.batch_norm`` and ``F.layer_norm`` as compositions of plain tensor ops.

    torch 2.13's batching rules for the fused normalisation kernels give a wrong
    second-order gradient under ``vmap`` (BatchNorm ~0.4%, affine LayerNorm ~0.5% off in
    float64); the same function written with mean/var/rsqrt is exact.
    """

    _PLAIN: dict[Callable[..., Tensor], Callable[..., Tensor]] = {
        nnf.batch_norm: _batch_norm,
        nnf.layer_norm: _layer_norm,
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return self._PLAIN.get(func, func)(*args, **(kwargs or {}))


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)


def plain_norms(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Context in which ``model``'s normalisation layers are exact under ``vmap``.

    A no-op (no per-op Python overhead) for models without such layers."""
    if any(isinstance(m, _NORMS) for m in model.modules()):
        return _PlainNorms()
    return contextlib.nullcontext()


def batched_forward(model: nn.Module, params: Params, buffers: Params, x: Tensor) -> Tensor:
    """Per-task parameters ``[tasks, ...]`` on inputs ``[tasks, n, ...]`` with ``vmap``."""
    return vmap(lambda p, xt: forward(model, p, buffers, xt))(params, x)
