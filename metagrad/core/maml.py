"""``MAML``: the user-facing module around the functional core."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from . import functional as F
from .functional import LossFn, Params
from .strategy import Verdict, cheap_under_vmap, static_blocker, vmap_matches_loop


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
            model), ``False`` loops over tasks, ``None`` picks the fastest exact one.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        vectorize: bool | None = None,
    ) -> None:
        super().__init__()
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
        self._verdicts: dict[tuple, Verdict] = {}

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    # ------------------------------------------------------------------ strategy
    def strategy(
        self, data: tuple[Tensor, Tensor, Tensor, Tensor], *, steps: int, first_order: bool
    ) -> Verdict:
        """Which execution strategy runs this batch, and why (decided once, then cached)."""
        device = data[0].device
        key = (device.type, data[0].dtype, steps, first_order, self.model.training)
        if key in self._verdicts:
            return self._verdicts[key]
        blocker = static_blocker(self.model)
        if self.vectorize is False:
            verdict = Verdict(False, "vectorize=False")
        elif blocker is not None:
            if self.vectorize:
                raise ValueError(f"vectorize=True is not possible for this model: {blocker}")
            verdict = Verdict(False, blocker)
        elif self.vectorize is None and not cheap_under_vmap(self.model, device):
            verdict = Verdict(False, "per-task loop is faster for these layers on this device")
        else:
            ok, why = vmap_matches_loop(
                self.model, self.loss_fn, data,
                lr=self.inner_lr, steps=max(steps, 1), first_order=first_order,
            )  # fmt: skip
            if not ok and self.vectorize:
                raise ValueError(
                    f"vectorize=True is not exact for this model: {why}; "
                    "use vectorize=False or leave it unset"
                )
            verdict = Verdict(ok, why)
        self._verdicts[key] = verdict
        return verdict

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
            vectorize=verdict.vectorize,
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
        vectorize = self.strategy(data, steps=1, first_order=True).vectorize
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
