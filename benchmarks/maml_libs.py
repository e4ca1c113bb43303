"""One MAML meta-gradient, written idiomatically with each library.

Every entry maps ``(model, loss_fn, lr, steps, first_order)`` to a function of a task batch
``(support_x, support_y, query_x, query_y)`` (leading task dimension) that computes the mean
query loss over tasks after ``steps`` inner SGD steps of size ``lr`` and leaves the
meta-gradient in ``model``'s ``.grad`` fields. Peers are imported lazily: a missing peer is
reported by :func:`missing`, never an import error.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

Batch = tuple[Tensor, Tensor, Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
Step = Callable[[Batch], Tensor]
Factory = Callable[[nn.Module, LossFn, float, int, bool], Step]


class Metagrad:
    """metagrad's ``MAML.meta_backward`` with its default strategy (kept, so its verdict can
    be read); ``compile=True`` for the compiled variant."""

    compile = False

    def __init__(self, model: nn.Module, loss_fn: LossFn, lr: float, steps: int, fo: bool):
        from metagrad import MAML

        self.maml = MAML(
            model, loss_fn, inner_lr=lr, inner_steps=steps, first_order=fo, compile=self.compile
        )

    def __call__(self, batch: Batch) -> Tensor:
        loss = self.maml.meta_backward(*batch)
        assert isinstance(loss, Tensor)
        return loss


class MetagradCompiled(Metagrad):
    compile = True


def _higher(model: nn.Module, loss_fn: LossFn, lr: float, steps: int, fo: bool) -> Step:
    import higher

    inner_opt = torch.optim.SGD(model.parameters(), lr=lr)

    def step(batch: Batch) -> Tensor:
        tasks, total = batch[0].shape[0], batch[0].new_zeros(())
        for sx, sy, qx, qy in zip(*batch, strict=True):
            with higher.innerloop_ctx(
                model, inner_opt, copy_initial_weights=False, track_higher_grads=not fo
            ) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(loss_fn(fmodel(sx), sy))
                loss = loss_fn(fmodel(qx), qy) / tasks
                if fo:  # fast weights are detached (no meta-gradient at all from backward()):
                    # FOMAML adds d(query)/d(fast weights) to the initial weights' grads
                    grads = torch.autograd.grad(loss, list(fmodel.parameters()))
                    for p, g in zip(model.parameters(), grads, strict=True):
                        p.grad = g if p.grad is None else p.grad + g
                else:
                    loss.backward()  # per task, as in higher's MAML example
            total = total + loss.detach()
        return total

    return step


Update = Callable[[dict, dict, object], tuple[dict, object]]


def _functional_loop(make_update: Callable[[float], Update]) -> Factory:
    """A per-task loop on ``torch.func.functional_call``; ``make_update(lr)`` makes SGD steps."""

    def factory(model: nn.Module, loss_fn: LossFn, lr: float, steps: int, fo: bool) -> Step:
        update = make_update(lr)
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())

        def step(batch: Batch) -> Tensor:
            losses = []
            for sx, sy, qx, qy in zip(*batch, strict=True):
                p, state = params, None
                for _ in range(steps):
                    loss = loss_fn(functional_call(model, (p, buffers), (sx,)), sy)
                    g = torch.autograd.grad(loss, list(p.values()), create_graph=not fo)
                    p, state = update(p, dict(zip(p, g, strict=True)), state)
                losses.append(loss_fn(functional_call(model, (p, buffers), (qx,)), qy))
            loss = torch.stack(losses).mean()
            loss.backward()
            return loss

        return step

    return factory


def _sgd(lr: float) -> Update:
    return lambda p, g, state: ({k: v - lr * g[k] for k, v in p.items()}, None)


def _torchopt_sgd(lr: float) -> Update:
    import torchopt

    opt = torchopt.sgd(lr=lr)

    def update(p: dict, g: dict, state: object) -> tuple[dict, object]:
        state = opt.init(p) if state is None else state
        updates, state = opt.update(g, state, inplace=False)
        return torchopt.apply_updates(p, updates, inplace=False), state

    return update


def _torchopt_metasgd(model: nn.Module, loss_fn: LossFn, lr: float, steps: int, fo: bool) -> Step:
    import torchopt

    if fo:
        raise NotImplementedError("MetaSGD always differentiates through the inner step")
    inner_opt = torchopt.MetaSGD(model, lr=lr)

    def step(batch: Batch) -> Tensor:
        net_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
        opt_state = torchopt.extract_state_dict(inner_opt, by="reference")
        losses = []
        for sx, sy, qx, qy in zip(*batch, strict=True):
            for _ in range(steps):
                inner_opt.step(loss_fn(model(sx), sy))
            losses.append(loss_fn(model(qx), qy))
            torchopt.recover_state_dict(model, net_state)
            torchopt.recover_state_dict(inner_opt, opt_state)
        loss = torch.stack(losses).mean()
        loss.backward()
        return loss

    return step


# name -> (module that must be importable, factory, idiom shown in the report)
LIBS: dict[str, tuple[str, Factory, str]] = {
    "metagrad": ("metagrad", Metagrad, "MAML.meta_backward (default strategy)"),
    "metagrad-compile": (
        "metagrad",
        MetagradCompiled,
        "MAML(compile=True).meta_backward (compile time apart)",
    ),
    "higher": ("higher", _higher, "innerloop_ctx, SGD, per-task backward"),
    "torchopt": ("torchopt", _functional_loop(_torchopt_sgd), "torchopt.sgd + functional_call"),
    "torchopt-metasgd": ("torchopt", _torchopt_metasgd, "MetaSGD + extract/recover_state_dict"),
    "autograd": ("torch", _functional_loop(_sgd), "plain autograd.grad loop (reference)"),
}


def missing(name: str) -> str | None:
    """Why library ``name`` cannot run here, or None."""
    module = LIBS[name][0]
    if importlib.util.find_spec(module) is None:
        return f"{module} not installed"
    return None
