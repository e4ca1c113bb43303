"""The compiled executor: the meta-gradient as a ``torch.compile``-d ``torch.func.grad`` of
the meta-loss, one graph per (strategy, steps, order, device, dtype), each checked once
against eager autograd before it is trusted.

Learned rates and multi-step weights are inputs of the compiled function (a new value never
recompiles or goes stale); a vmapped batch is one graph, a looped batch reuses one per-task
graph.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from . import executors
from .executors import Data, Problem
from .spec import Hyper, Params
from .strategy import as_double, float64_copy

Grads = tuple[Params, Params]  # (trainable parameters, learned rates)


def eager_meta_grad(problem: Problem, params: Params, hyper: Hyper, data: Data,
                    strategy: bool | str) -> dict[str, Tensor]:  # fmt: skip
    """Eager autograd's meta-gradient of the trainable parameters and learned rates."""
    wrt = {k: p for k, p in params.items() if p.requires_grad}
    wrt |= {f"lr:{k}": r for k, r in hyper.rates.items() if r.requires_grad}
    with torch.enable_grad():
        losses, _ = executors.run(problem, params, hyper, data, strategy)
        gs = torch.autograd.grad(losses.mean(), list(wrt.values()), allow_unused=True)
    return {
        k: torch.zeros_like(p) if g is None else g
        for (k, p), g in zip(wrt.items(), gs, strict=True)
    }


class Compiled:
    """Compiled meta-gradients for one learner. ``mode``: ``True`` always (a graph that fails
    its check raises), ``None`` on CUDA only (a graph that fails is dropped with a warning
    and the batch runs eagerly), ``False`` never."""

    AUTO_DEVICES = ("cuda",)  # where compile=None compiles (eager launches dominate there)

    def __init__(self, mode: bool | None) -> None:
        self.mode = mode
        self._fns: dict[tuple, Callable[..., tuple[Grads, tuple[Tensor, Tensor]]]] = {}
        self._refused: set[tuple] = set()

    def wanted(self, key: tuple) -> bool:
        if self.mode is None:
            return key[3] in self.AUTO_DEVICES and key not in self._refused
        return self.mode

    def _fn(
        self, key: tuple, problem: Problem
    ) -> Callable[..., tuple[Grads, tuple[Tensor, Tensor]]]:
        if key not in self._fns:
            strategy = key[0]

            def loss(trainable: Params, rates: Params, weights: Tensor | None, frozen: Params,
                     buffers: Params, *data: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:  # fmt: skip
                p = replace(problem, buffers=buffers)
                losses, outputs = executors.run(p, trainable | frozen, Hyper(rates, weights),
                                                data, strategy, autograd=False)  # type: ignore[arg-type]  # fmt: skip
                mean = losses.mean()
                return mean, (mean.detach(), outputs.detach())

            # on CPU a C++ wrapper around the kernels saves the Python call overhead that
            # dominates small models (~15% of a sinusoid meta-iteration)
            options: dict[str, Any] | None = {"cpp_wrapper": True} if key[3] == "cpu" else None
            fn = torch.func.grad(loss, argnums=(0, 1), has_aux=True)
            self._fns[key] = torch.compile(fn, dynamic=False, options=options)
        return self._fns[key]

    def backward(self, key: tuple, problem: Problem, params: Params, hyper: Hyper,
                 data: Data) -> tuple[Tensor, Tensor] | None:  # fmt: skip
        """The compiled meta-gradient into ``.grad``; the mean loss and outputs. ``None``
        where ``mode=None`` and this graph failed its check (nothing accumulated)."""
        strategy, n = key[0], data[0].shape[0]
        fresh = key not in self._fns
        fn = self._fn(key, problem)
        trainable = {k: p.detach() for k, p in params.items() if p.requires_grad}
        frozen = {k: p.detach() for k, p in params.items() if not p.requires_grad}
        rates = {k: r.detach() for k, r in hyper.rates.items()}
        args = (trainable, rates, hyper.weights, frozen, problem.buffers)
        if strategy is True:
            (g_p, g_r), (loss, outputs) = fn(*args, *data)
        else:
            g_p, g_r, losses, outs = {}, {}, [], []
            for task in executors.tasks(tuple(t.unsqueeze(1) for t in data)):  # type: ignore[arg-type]
                (gp, gr), (loss_t, out_t) = fn(*args, *task)
                g_p = gp if not g_p else {k: g_p[k] + gp[k] for k in g_p}
                g_r = gr if not g_r else {k: g_r[k] + gr[k] for k in g_r}
                losses.append(loss_t)
                outs.append(out_t[0])
            g_p = {k: g / n for k, g in g_p.items()}
            g_r = {k: g / n for k, g in g_r.items()}
            loss, outputs = torch.stack(losses).mean(), torch.stack(outs)
        grads = g_p | {f"lr:{k}": g for k, g in g_r.items()}
        if fresh:
            try:
                self._check(key, problem, params, hyper, data, grads)
            except RuntimeError as e:
                if self.mode is not None:
                    raise
                self._refused.add(key)
                warnings.warn(f"{e}; running eagerly instead", RuntimeWarning, stacklevel=4)
                return None
        targets = {k: p for k, p in params.items() if p.requires_grad}
        targets |= {f"lr:{k}": r for k, r in hyper.rates.items() if r.requires_grad}
        for k, p in targets.items():
            p.grad = grads[k] if p.grad is None else p.grad + grads[k]
        return loss, outputs

    def _check(self, key: tuple, problem: Problem, params: Params, hyper: Hyper, data: Data,
               grads: dict[str, Tensor]) -> None:  # fmt: skip
        """Compare a new compiled meta-gradient with eager autograd on its first batch.

        torch.compile is not exact for every model. The first test is closeness to the eager
        gradient at ``sqrt(eps)`` of the largest gradient. In float32 that is too tight for
        ill-conditioned models (BatchNorm over 5 support images amplifies rounding: on
        Omniglot both eager and compiled are ~1e-3 of the largest gradient off the float64
        one), so a gradient that fails it is held against the float64 eager gradient: its
        largest error must be at most 4x eager float32's own (plus ``eps`` of the largest).
        """
        strategy = key[0]
        ref = eager_meta_grad(problem, params, hyper, data, strategy)
        scale = max([r.abs().max().item() for r in ref.values()] + [1e-30])
        eps = torch.finfo(data[0].dtype).eps
        if all((grads[k] - r).abs().max().item() <= eps**0.5 * scale for k, r in ref.items()):
            return
        if data[0].dtype != torch.float64:
            p64, params64, _, h64 = float64_copy(problem, hyper)
            data64 = tuple(as_double(t) for t in data)
            exact = eager_meta_grad(p64, params64, h64, data64, strategy)  # type: ignore[arg-type]
            eager_err = max((r.double() - exact[k]).abs().max().item() for k, r in ref.items())
            err = max((grads[k].double() - exact[k]).abs().max().item() for k in ref)
            if err <= 4 * eager_err + eps * scale:
                return
        name, err = max(((k, (grads[k] - r).abs().max().item()) for k, r in ref.items()),
                        key=lambda t: t[1])  # fmt: skip
        del self._fns[key]
        raise RuntimeError(
            f"compile=True is not exact for this model: the compiled meta-gradient "
            f"of {name!r} is off by {err:.3g} (largest gradient {scale:.3g}); "
            "construct MAML with compile=False"
        )
