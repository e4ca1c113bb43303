"""``MAML``: the user-facing module around the functional core."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from . import functional as F
from .functional import LossFn, Params
from .malloc import keep_freed_memory
from .strategy import (
    Verdict,
    channels_last_query,
    cheap_under_vmap,
    small_support,
    static_blocker,
    vmap_matches_loop,
)


class Adapted:
    """A model bound to task-adapted ("fast") parameters; call it like the model."""

    def __init__(self, model: nn.Module, params: Params, buffers: Params) -> None:
        self.model = model
        self.params = params
        self.buffers = buffers

    def __call__(self, x: Tensor) -> Tensor:
        return F.forward(self.model, self.params, self.buffers, x)

    def named_parameters(self) -> list[tuple[str, Tensor]]:
        return list(self.params.items())


def _check_batch(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> None:
    named = {"support_x": sx, "support_y": sy, "query_x": qx, "query_y": qy}
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}; expected [tasks, shots, ...] "
                "(use MAML.adapt for a single task)"
            )
    tasks = {n: t.shape[0] for n, t in named.items()}
    if len(set(tasks.values())) != 1:
        raise ValueError(f"task dimensions differ: {tasks}; all four need the same [tasks, ...]")
    if sx.shape[1] != sy.shape[1]:
        raise ValueError(
            f"support_x {tuple(sx.shape)} and support_y {tuple(sy.shape)} have different "
            "numbers of examples per task"
        )
    if qx.shape[1] != qy.shape[1]:
        raise ValueError(
            f"query_x {tuple(qx.shape)} and query_y {tuple(qy.shape)} have different "
            "numbers of examples per task"
        )


class MAML(nn.Module):
    """Model-Agnostic Meta-Learning (Finn et al., 2017) for any ``nn.Module``.

    Args:
        model: the network whose initial parameters are meta-learned.
        loss_fn: ``loss_fn(prediction, target) -> scalar`` used in the inner and outer loop.
        inner_lr: step size alpha of the inner gradient descent.
        inner_steps: inner steps during meta-training.
        first_order: treat inner gradients as constants (FOMAML) instead of
            backpropagating through them.
        vectorize: ``True`` batches tasks with ``vmap`` (after checking it is exact for this
            model), ``False`` loops over tasks, ``"support"`` adapts all tasks at once with
            ``vmap`` and loops over the query sets (checked the same way), ``None`` picks the
            fastest exact one (see :meth:`strategy`).
        channels_last: run the per-task query passes (not those under ``vmap``) with
            images and conv weights in ``torch.channels_last`` memory format: the same
            values, faster oneDNN kernels on CPU. ``None``: on CPU for models with
            ``nn.Conv2d`` layers and image inputs ``[tasks, n, C, H, W]``.
        compile: run :meth:`meta_backward` as a ``torch.compile``-d
            ``torch.func.grad`` of the meta-loss (with the loss as aux) (one graph for a vmapped batch,
            one per-task graph reused across a loop). The first call per input shape pays
            the compile time (tens of seconds on a CPU); worth it for small models trained
            for many iterations. :meth:`meta_loss` itself always runs eagerly. ``None``:
            compile on CUDA devices (where eager execution is bound by kernel launches),
            and where a compiled gradient fails its exactness check, warn and run eagerly
            instead of raising.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        vectorize: bool | str | None = None,
        compile: bool | None = False,
        channels_last: bool | None = None,
    ) -> None:
        super().__init__()
        if vectorize not in (None, True, False, "support"):
            raise ValueError(f"vectorize must be None, True, False or 'support', got {vectorize!r}")
        if inner_steps < 0:
            raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
        if inner_lr <= 0:
            raise ValueError(f"inner_lr must be > 0, got {inner_lr}")
        self.model = model
        self.loss_fn = loss_fn
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.first_order = bool(first_order)
        self.vectorize = vectorize
        self.compile = compile if compile is None else bool(compile)
        self.channels_last = channels_last if channels_last is None else bool(channels_last)
        blocker = static_blocker(model)
        if self.compile and blocker is not None:
            raise ValueError(
                "compile=True needs a model that runs under torch.func transforms without "
                f"in-place buffer updates, and this one does not: {blocker}"
            )
        self._verdicts: dict[tuple, Verdict] = {}
        self._grad_fns: dict[tuple, Callable[..., tuple[Params, tuple[Tensor, Tensor]]]] = {}
        self._not_compiled: set[tuple] = set()  # refused under compile=None: run eagerly

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    # ------------------------------------------------------------------ strategy
    def strategy(
        self, data: tuple[Tensor, Tensor, Tensor, Tensor], *, steps: int, first_order: bool
    ) -> Verdict:
        """Which execution strategy runs this batch, and why (decided once, then cached).

        With ``vectorize=None``: on CUDA, and for small dense models on CPU, ``vmap`` over
        the tasks; for other models on CPU ``"support"`` where one task's support inputs
        are small (``strategy.SMALL_SUPPORT`` values), else the per-task loop. A batched
        strategy is used only after it matched the loop in float64 on this model.
        """
        device = data[0].device
        key = (device.type, data[0].dtype, steps, first_order, self.model.training)
        if key in self._verdicts:
            return self._verdicts[key]
        blocker = static_blocker(self.model)
        if self.vectorize is False:
            verdict = Verdict(False, "vectorize=False")
        elif blocker is not None:
            if self.vectorize:
                raise ValueError(
                    f"vectorize={self.vectorize!r} is not possible for this model: {blocker}"
                )
            verdict = Verdict(False, blocker)
        elif (
            self.vectorize is None
            and not cheap_under_vmap(self.model, device)
            and not small_support(data[0], steps)
        ):
            verdict = Verdict(False, "per-task loop is faster for these layers on this device")
        else:
            batched: bool | str = self.vectorize
            if batched is None:
                batched = True if cheap_under_vmap(self.model, device) else "support"
            ok, why = vmap_matches_loop(
                self.model, self.loss_fn, data, vectorize=batched,
                lr=self.inner_lr, steps=max(steps, 1), first_order=first_order,
            )  # fmt: skip
            if not ok and self.vectorize:
                raise ValueError(
                    f"vectorize={self.vectorize!r} is not exact for this model: {why}; "
                    "use vectorize=False or leave it unset"
                )
            verdict = Verdict(batched if ok else False, why)
        self._verdicts[key] = verdict
        return verdict

    def _channels_last(self, query_x: Tensor) -> bool:
        if self.channels_last is None:
            return channels_last_query(self.model, query_x)
        return self.channels_last and query_x.dim() == 5

    # ------------------------------------------------------------------ API
    def _params_buffers(self) -> tuple[Params, Params]:
        return dict(self.model.named_parameters()), dict(self.model.named_buffers())

    def task_losses(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        *,
        steps: int | None = None,
        first_order: bool | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Per-task query losses ``[tasks]`` and query predictions ``[tasks, query, ...]``."""
        _check_batch(support_x, support_y, query_x, query_y)
        steps = self.inner_steps if steps is None else steps
        first_order = self.first_order if first_order is None else first_order
        data = (support_x, support_y, query_x, query_y)
        verdict = self.strategy(data, steps=steps, first_order=first_order)
        params, buffers = self._params_buffers()
        return F.batched_query_loss(
            self.model, self.loss_fn, params, buffers, *data,
            lr=self.inner_lr, steps=steps, first_order=first_order,
            vectorize=verdict.vectorize, autograd=torch.is_grad_enabled(),
            channels_last=self._channels_last(query_x),
        )  # fmt: skip

    def meta_loss(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        *,
        return_outputs: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Mean over tasks of the query loss after inner adaptation on the support set.

        Inputs carry a leading task dimension, ``[tasks, shots, ...]``. ``backward()`` on
        the result puts the meta-gradient on ``self.parameters()``. With
        ``return_outputs=True`` also returns the query predictions ``[tasks, query, ...]``.
        """
        losses, outputs = self.task_losses(support_x, support_y, query_x, query_y)
        loss = losses.mean()
        return (loss, outputs) if return_outputs else loss

    def meta_backward(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        *,
        return_outputs: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``meta_loss(...).backward()`` in one call, run the cheapest exact way.

        Accumulates the meta-gradient into ``.grad`` of the parameters (like ``backward()``)
        and returns the meta-loss, detached (and, with ``return_outputs=True``, the detached
        query predictions). The gradient is the same as ``meta_loss(...).backward()``'s;
        what differs is the cost: with the per-task loop each task's graph is freed by its
        own backward before the next task runs (peak memory of one task instead of the
        whole meta-batch), and with ``compile=True`` the gradient comes from a compiled
        ``torch.func.grad`` (see the class docstring).
        """
        _check_batch(support_x, support_y, query_x, query_y)
        if not torch.is_grad_enabled():
            raise RuntimeError("meta_backward needs grad mode; it was called under torch.no_grad()")
        data = (support_x, support_y, query_x, query_y)
        steps, first_order = self.inner_steps, self.first_order
        vectorize = self.strategy(data, steps=steps, first_order=first_order).vectorize
        params, buffers = self._params_buffers()
        trainable = {k: p for k, p in params.items() if p.requires_grad}
        if not trainable:
            raise RuntimeError("meta_backward: no parameter of the model requires grad")
        tasks = support_x.shape[0]
        key = (vectorize, steps, first_order, support_x.device.type, support_x.dtype)
        if vectorize == "support" and self._compiles((False, *key[1:])):
            vectorize, key = False, (False, *key[1:])  # compiled graphs: vmapped or per task
        compiled = None
        if self._compiles(key):
            compiled = self._compiled_backward(key, params, trainable, buffers, data)
        if compiled is not None:
            loss, outputs = compiled
        elif vectorize == "support":
            loss, outputs = self._support_batched_backward(
                params, buffers, data, steps, first_order
            )
        elif vectorize:
            loss, outputs = self.meta_loss(*data, return_outputs=True)
            loss.backward()
        else:
            if support_x.device.type == "cpu":
                keep_freed_memory()  # each task frees its graph: keep that memory for the next
            losses, outs = [], []
            channels_last = self._channels_last(query_x)
            for sx, sy, qx, qy in zip(*data, strict=True):
                loss_t, out_t = F.query_loss(
                    self.model, self.loss_fn, params, buffers, sx, sy, qx, qy,
                    lr=self.inner_lr, steps=steps, first_order=first_order,
                    autograd=True, channels_last=channels_last,
                )  # fmt: skip
                (loss_t / tasks).backward()
                losses.append(loss_t.detach())
                outs.append(out_t.detach())
            loss, outputs = torch.stack(losses).mean(), torch.stack(outs)
        loss, outputs = loss.detach(), outputs.detach()
        return (loss, outputs) if return_outputs else loss

    def _support_batched_backward(
        self,
        params: Params,
        buffers: Params,
        data: tuple[Tensor, Tensor, Tensor, Tensor],
        steps: int,
        first_order: bool,
    ) -> tuple[Tensor, Tensor]:
        """The ``"support"`` strategy's meta-gradient into ``.grad``; the loss and outputs.

        All tasks are adapted at once under ``vmap``. Each task's query loss is then
        differentiated with respect to its adapted parameters, detached, so that its graph
        is freed before the next task, and one backward through the batched adaptation
        carries these gradients to the meta-parameters: the chain rule, split in two.
        """
        support_x, support_y, query_x, query_y = data
        tasks = support_x.shape[0]
        fast = F.batched_adapt(
            self.model, self.loss_fn, params, buffers, support_x, support_y,
            lr=self.inner_lr, steps=steps, first_order=first_order,
        )  # fmt: skip
        if support_x.device.type == "cpu":
            keep_freed_memory()
        channels_last = self._channels_last(query_x)
        live = [k for k, v in fast.items() if v.requires_grad]  # frozen ones may depend too
        grads = {k: torch.empty_like(fast[k]) for k in live}
        losses, outs = [], []
        for t, (qx, qy) in enumerate(zip(query_x, query_y, strict=True)):
            p = {k: v[t].detach().requires_grad_(k in grads) for k, v in fast.items()}
            q = p
            if channels_last:
                q, qx = F.to_channels_last(p, qx)
            out = F.forward(self.model, q, buffers, qx)
            loss_t = self.loss_fn(out, qy)
            if live:
                gs = torch.autograd.grad(
                    loss_t / tasks, [p[k] for k in live], allow_unused=True, materialize_grads=True
                )
                for k, g in zip(live, gs, strict=True):
                    grads[k][t] = g
            losses.append(loss_t.detach())
            outs.append(out.detach())
        if live:
            torch.autograd.backward([fast[k] for k in live], [grads[k] for k in live])
        return torch.stack(losses).mean(), torch.stack(outs)

    def _compiles(self, key: tuple) -> bool:
        if self.compile is None:  # auto: on CUDA, unless refused there
            return key[3] == "cuda" and key not in self._not_compiled
        return self.compile

    def _compiled_backward(
        self,
        key: tuple,
        params: Params,
        trainable: Params,
        buffers: Params,
        data: tuple[Tensor, Tensor, Tensor, Tensor],
    ) -> tuple[Tensor, Tensor] | None:
        """The compiled meta-gradient into ``.grad``; the loss and outputs, or None where
        ``compile=None`` and this graph failed its exactness check (then nothing is
        accumulated and the caller runs eagerly)."""
        vectorize, tasks = key[0], data[0].shape[0]
        fresh = key not in self._grad_fns
        fn = self._compiled_grad(key)
        frozen = {k: p.detach() for k, p in params.items() if not p.requires_grad}
        detached = {k: p.detach() for k, p in trainable.items()}
        if vectorize:
            grads, (loss, outputs) = fn(detached, frozen, buffers, *data)
        else:
            grads, losses, outs = {}, [], []
            for task in zip(*(t.unsqueeze(1) for t in data), strict=True):
                g, (loss_t, out_t) = fn(detached, frozen, buffers, *task)
                grads = g if not grads else {k: grads[k] + g[k] for k in grads}
                losses.append(loss_t)
                outs.append(out_t[0])
            grads = {k: g / tasks for k, g in grads.items()}
            loss, outputs = torch.stack(losses).mean(), torch.stack(outs)
        if fresh:
            try:
                self._check_compiled(key, grads, data)
            except RuntimeError as e:
                if self.compile is not None:
                    raise
                self._not_compiled.add(key)
                warnings.warn(f"{e}; running eagerly instead", RuntimeWarning, stacklevel=3)
                return None
        for k, p in trainable.items():
            p.grad = grads[k] if p.grad is None else p.grad + grads[k]
        return loss, outputs

    def _check_compiled(self, key: tuple, grads: Params, data: tuple[Tensor, ...]) -> None:
        """Compare a new compiled meta-gradient with eager autograd on its first batch.

        torch.compile is not exact for every model, so each compiled graph must match
        eager autograd once before it is trusted. The first test is closeness to the eager
        gradient at ``sqrt(eps)`` of the largest gradient. In float32 that is too tight for
        ill-conditioned models (BatchNorm over 5 support images amplifies rounding: on
        Omniglot both eager and compiled are ~1e-3 of the largest gradient off the float64
        gradient), so a gradient that fails it is held against the float64 eager gradient:
        its largest error over all parameters must be at most 4x eager float32's own
        (plus ``eps`` of the largest gradient).
        """
        ref = self._eager_meta_grad(self, data)
        scale = max([r.abs().max().item() for r in ref.values()] + [1e-30])
        eps = torch.finfo(data[0].dtype).eps
        if all((grads[k] - r).abs().max().item() <= eps**0.5 * scale for k, r in ref.items()):
            return
        if data[0].dtype != torch.float64:
            model64 = MAML(
                copy.deepcopy(self.model).double(), self.loss_fn, self.inner_lr,
                self.inner_steps, self.first_order, vectorize=self.vectorize,
            )  # fmt: skip
            data64 = tuple(t.double() if t.is_floating_point() else t for t in data)
            exact = self._eager_meta_grad(model64, data64)
            eager_err = max((r.double() - exact[k]).abs().max().item() for k, r in ref.items())
            err = max((grads[k].double() - exact[k]).abs().max().item() for k in ref)
            if err <= 4 * eager_err + eps * scale:
                return
        name, err = max(((k, (grads[k] - r).abs().max().item()) for k, r in ref.items()),
                        key=lambda t: t[1])  # fmt: skip
        del self._grad_fns[key]
        raise RuntimeError(
            f"compile=True is not exact for this model: the compiled meta-gradient "
            f"of {name!r} is off by {err:.3g} (largest gradient {scale:.3g}); "
            "construct MAML with compile=False"
        )

    @staticmethod
    def _eager_meta_grad(maml: MAML, data: tuple[Tensor, ...]) -> Params:
        """Eager autograd's meta-gradient of ``maml``'s trainable parameters."""
        trainable = [(k, p) for k, p in maml.model.named_parameters() if p.requires_grad]
        loss = maml.meta_loss(*data)
        grads = torch.autograd.grad(loss, [p for _, p in trainable], allow_unused=True)
        return {
            k: torch.zeros_like(p) if g is None else g
            for (k, p), g in zip(trainable, grads, strict=True)
        }

    def _compiled_grad(self, key: tuple) -> Callable[..., tuple[Params, tuple[Tensor, Tensor]]]:
        vectorize, steps, first_order = key[:3]
        if key not in self._grad_fns:
            model, loss_fn, lr = self.model, self.loss_fn, self.inner_lr

            def loss(
                trainable: Params, frozen: Params, buffers: Params, *data: Tensor
            ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
                losses, outputs = F.batched_query_loss(
                    model, loss_fn, trainable | frozen, buffers, *data,
                    lr=lr, steps=steps, first_order=first_order, vectorize=vectorize,
                )  # fmt: skip
                mean = losses.mean()
                return mean, (mean.detach(), outputs.detach())

            # on CPU a C++ wrapper around the kernels saves the Python call overhead that
            # dominates small models (~15% of a sinusoid meta-iteration)
            options = {"cpp_wrapper": True} if key[3] == "cpu" else None
            grads_and_aux = torch.func.grad(loss, has_aux=True)  # -> (grads, aux)
            self._grad_fns[key] = torch.compile(grads_and_aux, dynamic=False, options=options)
        return self._grad_fns[key]

    def adapt(
        self,
        x: Tensor,
        y: Tensor,
        steps: int | None = None,
        *,
        lr: float | None = None,
        first_order: bool | None = None,
    ) -> Adapted:
        """Adapt to one task (no task dimension); returns a callable adapted model.

        The adapted parameters are differentiable with respect to the meta-parameters
        unless ``first_order`` (or run under ``torch.no_grad()``).
        """
        params, buffers = self._params_buffers()
        fast = F.adapt(
            self.model, self.loss_fn, params, buffers, x, y,
            lr=self.inner_lr if lr is None else lr,
            steps=self.inner_steps if steps is None else steps,
            first_order=self.first_order if first_order is None else first_order,
        )  # fmt: skip
        return Adapted(self.model, fast, buffers)

    @torch.no_grad()
    def adaptation_curve(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        steps: int,
        metrics: Mapping[str, Callable[[Tensor, Tensor], Tensor]],
        *,
        lr: float | None = None,
    ) -> dict[str, Tensor]:
        """Metrics on the query sets after 0..``steps`` inner steps: ``{name: [tasks, steps+1]}``.

        Used for evaluation; runs without building a meta-gradient graph.
        """
        _check_batch(support_x, support_y, query_x, query_y)
        data = (support_x, support_y, query_x, query_y)
        vectorize = self.strategy(data, steps=1, first_order=True).vectorize is True
        params, buffers = self._params_buffers()
        lr = self.inner_lr if lr is None else lr
        names = list(metrics)

        def one(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
            p = {k: v.detach() for k, v in params.items()}
            rows = []
            for step in range(steps + 1):
                if step:
                    p = F.adapt(
                        self.model, self.loss_fn, p, buffers, sx, sy,
                        lr=lr, steps=1, first_order=True,
                    )  # fmt: skip
                out = F.forward(self.model, p, buffers, qx)
                rows.append(torch.stack([metrics[n](out, qy) for n in names]))
            return torch.stack(rows, dim=-1)  # [metrics, steps+1]

        if vectorize:
            curves = torch.vmap(one, randomness="different")(*data)
        else:
            curves = torch.stack([one(*t) for t in zip(*data, strict=True)])
        return {n: curves[:, i] for i, n in enumerate(names)}
