"""What the algorithms that fill ``.grad`` themselves (Reptile, iMAML) share."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor


def refuse(algorithm: str, kwargs: dict[str, Any], keys: Iterable[str], why: str) -> None:
    """Drop ``MAML`` options ``algorithm`` has no use for from ``kwargs``; a truthy one is
    a ``TypeError``."""
    for key in keys:
        if kwargs.get(key):
            raise TypeError(f"{algorithm} does not take {key}= ({why})")
        kwargs.pop(key, None)


def add_to_grad(params: Mapping[str, Tensor], grads: Mapping[str, Tensor]) -> None:
    """Accumulate ``grads`` into the parameters' ``.grad``, as ``backward()`` does."""
    with torch.no_grad():
        for name, g in grads.items():
            p = params[name]
            p.grad = g if p.grad is None else p.grad + g
