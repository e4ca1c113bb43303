"""``MAML``: the user-facing module. It holds the model, the adaptation spec and its learned
rates, and hands each batch to the fastest exact executor."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import executors
from . import spec as specs
from .adapt import Adapted, adapt, curve, support_loss
from .compiled import Compiled
from .executors import Data, Problem, check_batch
from .functional import LossFn
from .inner import SGD, UpdateRule
from .spec import AdaptArg, Hyper, Params, Spec
from .strategy import Verdict, channels_last_query, check_model, choose


class MAML(nn.Module):
    """Model-Agnostic Meta-Learning (Finn et al., 2017) and its family, for any ``nn.Module``.

    Args:
        model: the network whose initial parameters are meta-learned.
        loss_fn: ``loss_fn(prediction, target) -> scalar``, inner and outer loop.
        inner_lr: the inner step size (the start value of learned rates).
        inner_steps: inner steps during meta-training.
        first_order: inner gradients as constants (FOMAML).
        adapt: what the inner loop updates: ``None`` every parameter that requires grad;
            a callable ``name -> bool``; or name prefixes (``["head"]``: ANIL). The others
            are meta-learned and held constant inside the inner loop.
        learn_lr: ``None`` (fixed), ``"per-parameter"`` (Meta-SGD) or
            ``"per-layer-per-step"`` (MAML++ LSLR): rates that are parameters of this module.
        step_weights: ``None`` (the query loss after the last step) or one weight per inner
            step: the outer loss is their weighted sum of the query losses after each step
            (MAML++ multi-step loss). Settable between iterations (``maml.step_weights = w``).
        inner_optimizer: the update rule, ``mg.inner.SGD(momentum=...)`` or
            ``mg.inner.Adam(...)``; ``None`` is plain SGD. Its state starts at zero per task.
        vectorize: ``True`` vmap over tasks, ``False`` a loop, ``"support"`` vmap the
            adaptation and loop the queries, ``None`` the fastest exact one (see
            :meth:`strategy`); a batched strategy runs only after a float64 check.
        compile: ``meta_backward`` as a compiled ``torch.func.grad``, checked once per graph
            against eager autograd; ``None`` compiles on CUDA and falls back to eager.
        channels_last: per-task query passes in ``channels_last`` (``None``: CPU conv nets).
        checkpoint: recompute each inner step in backward (memory of one step; exact, eager).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> import metagrad as mg
        >>> model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> maml = mg.MAML(model, F.mse_loss, inner_lr=0.01, inner_steps=1)
        >>> g = torch.Generator().manual_seed(0)
        >>> sx, sy, qx, qy = mg.tasks.SinusoidTasks().sample(4, 5, 5, g).tensors()
        >>> sx.shape  # [tasks, shots, ...]
        torch.Size([4, 5, 1])
        >>> maml.meta_loss(sx, sy, qx, qy).backward()  # the meta-gradient lands on the model
        >>> model[0].weight.grad.shape
        torch.Size([8, 1])
        >>> fast = maml.adapt(sx[0], sy[0], steps=3)  # one task: no task dimension
        >>> fast(qx[0]).shape
        torch.Size([5, 1])
    """

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, inner_lr: float = 0.01, inner_steps: int = 1,
        first_order: bool = False, *, adapt: AdaptArg = None, learn_lr: str | None = None,
        step_weights: Sequence[float] | Tensor | None = None,
        inner_optimizer: UpdateRule | None = None, vectorize: bool | str | None = None,
        compile: bool | None = False, channels_last: bool | None = None,
        checkpoint: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        specs.check_arguments(inner_lr, inner_steps, inner_optimizer, vectorize, checkpoint, compile)  # fmt: skip
        check_model(model, compile, checkpoint)
        self.model, self.loss_fn = model, loss_fn
        self.inner_lr, self.inner_steps, self.first_order = float(inner_lr), int(inner_steps), bool(first_order)  # fmt: skip
        self.learn_lr = specs.check_learn_lr(learn_lr)
        self.inner_optimizer = inner_optimizer or SGD()
        self.vectorize, self.channels_last, self.checkpoint = False if checkpoint else vectorize, channels_last, bool(checkpoint)  # fmt: skip
        self.register_buffer("_weights", None, persistent=False)
        self._stepwise = specs.takes_step(model)
        params: Params = dict(model.named_parameters())
        trainable = {n for n, p in params.items() if p.requires_grad}
        self.adapts = specs.select(params, adapt, trainable)
        rates = specs.initial_rates(self.spec(), params)
        self.lrs = nn.ParameterDict({n.replace(".", "/"): nn.Parameter(r) for n, r in rates.items()})  # fmt: skip
        self.step_weights = step_weights  # type: ignore[assignment]  # the setter takes a sequence
        self._verdicts: dict[tuple, Verdict] = {}
        self._compiled = Compiled(compile)

    @property
    def step_weights(self) -> Tensor | None:
        return self._weights

    @step_weights.setter
    def step_weights(self, weights: Sequence[float] | Tensor | None) -> None:
        like = next(iter(self.model.parameters()), torch.empty(0))
        w = None if weights is None else specs.step_weights_tensor(weights, self.inner_steps)
        self._weights: Tensor | None = None if w is None else w.to(like.device, like.dtype)

    def schedule(self, iteration: int) -> None:
        """Called by training loops before meta-iteration ``iteration`` (0-based), for
        algorithms whose settings change over training (MAML++); MAML has none."""

    @property
    def compile_mode(self) -> bool | None:  # the compile argument
        return self._compiled.mode

    def _params(self) -> Params:
        return {n: p for n, p in self.model.named_parameters()}

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def spec(self, steps: int | None = None, first_order: bool | None = None) -> Spec:
        """The adaptation spec (static; the learned tensors are :meth:`hyper`)."""
        return Spec(
            self.adapts, self.inner_steps if steps is None else steps, self.inner_lr,
            self.first_order if first_order is None else first_order, self.learn_lr,
            self.inner_optimizer, self._weights is not None, self.checkpoint, self._stepwise,
        )  # fmt: skip

    def learned_lrs(self) -> dict[str, nn.Parameter]:
        """``{parameter name: its learned rate}`` (empty with a fixed ``inner_lr``)."""
        return {n: self.lrs[n.replace(".", "/")] for n in self.adapts if n.replace(".", "/") in self.lrs}  # fmt: skip

    def hyper(self) -> Hyper:
        return Hyper(dict(self.learned_lrs()), self._weights)

    def problem(self, steps: int | None = None, first_order: bool | None = None) -> Problem:
        return Problem(self.model, self.loss_fn, self.spec(steps, first_order), dict(self.model.named_buffers()))  # fmt: skip

    def strategy(self, data: Data, *, steps: int, first_order: bool) -> Verdict:
        """Which executor runs this batch and why (decided once per setting, then cached)."""
        device = data[0].device
        key = (device.type, data[0].dtype, steps, first_order, self.model.training, self._weights is None)  # fmt: skip
        if key not in self._verdicts:
            self._verdicts[key] = choose(self.problem(steps, first_order), self.hyper(), data, self.vectorize)  # fmt: skip
        return self._verdicts[key]

    def _channels_last(self, query_x: Tensor) -> bool:
        return channels_last_query(self.model, query_x) if self.channels_last is None else bool(self.channels_last and query_x.dim() == 5)  # fmt: skip

    def task_losses(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                    *, steps: int | None = None, first_order: bool | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
        """Per-task outer losses ``[tasks]`` and query predictions ``[tasks, query, ...]``."""
        check_batch(support_x, support_y, query_x, query_y)
        data = (support_x, support_y, query_x, query_y)
        problem = self.problem(steps, first_order)
        verdict = self.strategy(data, steps=problem.spec.steps, first_order=problem.spec.first_order)  # fmt: skip
        return executors.run(problem, self._params(), self.hyper(), data, verdict.vectorize,
                             channels_last=self._channels_last(query_x))  # fmt: skip

    def meta_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                  *, return_outputs: bool = False) -> Tensor | tuple[Tensor, Tensor]:  # fmt: skip
        """Mean over tasks of the outer loss after adaptation on the support sets; inputs
        are ``[tasks, shots, ...]``. ``backward()`` puts the meta-gradient on
        ``self.parameters()`` (the model's and the learned rates)."""
        losses, outputs = self.task_losses(support_x, support_y, query_x, query_y)
        return (losses.mean(), outputs) if return_outputs else losses.mean()

    def meta_backward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                      *, return_outputs: bool = False) -> Tensor | tuple[Tensor, Tensor]:  # fmt: skip
        """``meta_loss(...).backward()`` in one call, the cheapest exact way: the same
        gradient, accumulated into ``.grad``; returns the detached loss (and predictions).
        In the per-task loop each task's graph is freed before the next task runs."""
        check_batch(support_x, support_y, query_x, query_y)
        if not torch.is_grad_enabled():
            raise RuntimeError("meta_backward needs grad mode; it was called under torch.no_grad()")
        data = (support_x, support_y, query_x, query_y)
        problem, hyper, params = self.problem(), self.hyper(), self._params()
        if not any(p.requires_grad for p in self.parameters()):
            raise RuntimeError("meta_backward: no parameter of the model requires grad")
        strategy = self.strategy(data, steps=self.inner_steps, first_order=self.first_order).vectorize  # fmt: skip
        key = (strategy, self.inner_steps, self.first_order, support_x.device.type, support_x.dtype, self._weights is None)  # fmt: skip
        if strategy == "support" and self._compiled.wanted((False, *key[1:])):
            key = (False, *key[1:])  # compiled graphs: vmapped or per task
        out = None
        if self._compiled.wanted(key):
            out = self._compiled.backward(key, problem, params, hyper, data)
        if out is None:
            losses, outputs = executors.run(problem, params, hyper, data, strategy, backward=True,
                                            channels_last=self._channels_last(query_x))  # fmt: skip
            out = (losses.mean(), outputs)
        loss, outputs = out[0].detach(), out[1].detach()
        return (loss, outputs) if return_outputs else loss

    def adapt(self, x: Tensor, y: Tensor, steps: int | None = None, *, lr: float | None = None,
              first_order: bool | None = None) -> Adapted:  # fmt: skip
        """Adapt to one task (no task dimension); returns a callable adapted model whose
        parameters are differentiable w.r.t. the meta-parameters unless first order."""
        buffers, spec = dict(self.model.named_buffers()), self.spec(steps, first_order)
        fast = adapt(support_loss(self.model, self.loss_fn, buffers, x, y), self._params(), spec,
                     self.hyper(), lr=lr)  # fmt: skip
        assert isinstance(fast, dict)
        return Adapted(self.model, fast, buffers, max(spec.steps - 1, 0) if spec.stepwise else None)

    @torch.no_grad()
    def adaptation_curve(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                         steps: int, metrics: Mapping[str, Callable[[Tensor, Tensor], Tensor]],
                         *, lr: float | None = None) -> dict[str, Tensor]:  # fmt: skip
        """Metrics on the query sets after 0..``steps`` inner steps, ``{name: [tasks, steps+1]}``
        (evaluation: first order, no meta-gradient graph)."""
        check_batch(support_x, support_y, query_x, query_y)
        data = (support_x, support_y, query_x, query_y)
        vmapped = self.strategy(data, steps=1, first_order=True).vectorize is True
        params, buffers = {k: v.detach() for k, v in self._params().items()}, dict(self.model.named_buffers())  # fmt: skip
        spec, hyper, names = self.spec(steps, True), self.hyper(), list(metrics)
        fns = [metrics[n] for n in names]

        channels_last = not vmapped and self._channels_last(query_x)

        def one(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
            return curve(self.model, self.loss_fn, spec, hyper, params, buffers, (sx, sy, qx, qy), fns, lr, channels_last)  # fmt: skip

        if vmapped:
            curves = torch.vmap(one, randomness="different")(*data)
        else:
            curves = torch.stack([one(*t) for t in executors.tasks(data)])
        return {n: curves[:, i] for i, n in enumerate(names)}
