"""MAML with policy gradients and a TRPO outer step (MAML paper, section 5.3).

One meta-iteration on ``meta_batch`` tasks (:meth:`MAMLTRPO.step`):

1. Sample ``rollouts`` paths per task with the pre-update policy ``theta`` (one batched
   policy forward per time step over all envs).
2. Per task: fit the linear feature baseline, GAE advantages (``gamma``, ``gae_lambda``),
   normalised per task (rllab's ``center_adv``: centre and scale); REINFORCE loss
   ``L_i(theta) = -mean_t(log pi_theta(a_t|s_t) A_t)`` over the task's valid steps; one
   (or ``inner_steps``) gradient step ``theta'_i = theta - alpha grad L_i(theta)``. All
   tasks adapt at once through the core's inner loop, :func:`metagrad.core.adapt` (one
   step per inner batch, ``autograd=True``): ``theta`` is expanded to ``[tasks, ...]`` and
   one ``torch.autograd.grad`` of ``sum_i L_i`` gives every task's own gradient (task
   ``i``'s loss only reads row ``i``), with ``create_graph=True`` for the second-order
   meta-gradient; the per-task forward is :func:`metagrad.core.batched_forward` (vmap).
3. Sample post-update paths per task with its adapted policy (detached), through a
   :class:`~metagrad.rl.policy.TaskBatchedPolicy`: still one batched forward per step.
   With ``inner_steps > 1`` every inner step uses fresh paths of the policy adapted so
   far, as the original code did.
4. TRPO on ``theta`` for the post-update objective. :class:`MetaObjective` recomputes
   the adaptation from the candidate ``theta`` inside each closure, so the surrogate
   ``-mean_i mean_t(exp(log pi_theta'_i - log pi_old) A_post)`` and the constraint
   ``mean_i mean_t KL(pi_old || pi_theta'_i)`` on the post-update observations are
   differentiated through the inner step. The step uses :mod:`metagrad.rl.trpo`:
   conjugate gradient (:mod:`metagrad.core.linalg`) on KL Hessian-vector products: Fisher
   products through the inner step (:meth:`MetaObjective.fisher_product`, the default:
   the KL Hessian at the old policy), the exact double backward, or finite differences;
   then the backtracking line search (whose candidates are evaluated with one inner step
   and no second-order graph).

``adapt=False`` (methods ``pretrain`` and ``oracle``) is plain TRPO on the task
distribution: no inner step, the objective is on the pre-update paths.

:meth:`MAMLTRPO.adaptation_returns` is the test protocol of the original code: fresh
paths before and after each policy-gradient step (step sizes e.g. ``alpha, alpha/2,
alpha/2``), the average undiscounted return per path of each task after each step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .. import core
from ..core import MAML, Hyper, Spec
from ..core.malloc import keep_freed_memory
from .baseline import LinearFeatureBaseline
from .policy import TaskBatchedPolicy, diag_gaussian_kl, diag_gaussian_log_prob
from .returns import discounted_returns, gae_advantages, normalize_advantages
from .sampler import Task, Trajectories, VectorSampler
from .trpo import HVP, TRPOStepResult, trpo_step

Params = dict[str, Tensor]


# --------------------------------------------------------------------------- data
@dataclass
class PGBatch:
    """Paths of a meta-batch, flattened per task: ``N = paths_per_task * T`` rows each."""

    obs: Tensor  # [tasks, N, obs_dim]
    actions: Tensor  # [tasks, N, act_dim]
    advantages: Tensor  # [tasks, N]
    mask: Tensor  # [tasks, N]
    returns: Tensor  # [tasks] average undiscounted return per path

    @property
    def num_tasks(self) -> int:
        return self.obs.shape[0]

    def to(self, dtype: torch.dtype) -> PGBatch:
        return PGBatch(
            self.obs.to(dtype), self.actions.to(dtype), self.advantages.to(dtype),
            self.mask.to(dtype), self.returns.to(dtype),
        )  # fmt: skip


def path_returns(traj: Trajectories) -> Tensor:
    """Average undiscounted return per path of each task, ``[tasks]`` (task-major paths)."""
    tasks = len(traj.tasks)
    per_path = (traj.rewards * traj.mask).sum(1)
    return per_path.view(tasks, -1).mean(1)


def process_trajectories(
    traj: Trajectories, gamma: float = 0.99, gae_lambda: float = 1.0, normalize: bool = True
) -> PGBatch:
    """Per-task baseline fit, GAE advantages (normalised per task) and the per-task view."""
    tasks = len(traj.tasks)
    paths = traj.obs.shape[0]
    if tasks == 0 or paths % tasks:
        raise ValueError(f"{paths} paths do not split evenly over {tasks} tasks")
    per_task = paths // tasks
    if not torch.equal(traj.task_index, torch.arange(paths) // per_task):
        raise ValueError("paths must be task-major with the same number of paths per task")
    returns = discounted_returns(traj.rewards, traj.mask, gamma)
    values = LinearFeatureBaseline().fit_predict(traj.obs, returns, traj.mask, traj.task_index)
    adv = gae_advantages(traj.rewards, values, traj.mask, gamma, gae_lambda)
    if normalize:
        adv = normalize_advantages(adv, traj.mask, traj.task_index)
    return PGBatch(
        obs=traj.obs.reshape(tasks, -1, traj.obs.shape[-1]),
        actions=traj.actions.reshape(tasks, -1, traj.actions.shape[-1]),
        advantages=adv.reshape(tasks, -1),
        mask=traj.mask.reshape(tasks, -1),
        returns=path_returns(traj),
    )


# --------------------------------------------------------------------------- functional pieces
def _task_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over the valid rows of each task: ``[tasks, N] -> [tasks]``."""
    return (x * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """``t`` summed over the dimensions that ``shape`` broadcasts (size 1 there)."""
    dims = [i for i, (a, b) in enumerate(zip(t.shape, shape, strict=True)) if b == 1 and a != 1]
    return t.sum(dims, keepdim=True) if dims else t


def _grad_or_zeros(outputs: Sequence[Tensor], inputs: Sequence[Tensor],
                   grad_outputs: Sequence[Tensor]) -> list[Tensor]:  # fmt: skip
    """``torch.autograd.grad`` keeping the graph, zeros for inputs the outputs do not use."""
    gs = torch.autograd.grad(outputs, inputs, grad_outputs=grad_outputs, retain_graph=True,
                             allow_unused=True, materialize_grads=True)  # fmt: skip
    return list(gs)


def _per_row(log_std: Tensor, mean: Tensor) -> Tensor:
    return log_std.unsqueeze(-2) if log_std.dim() == mean.dim() - 1 else log_std


def task_distributions(
    module: nn.Module, params: Params, buffers: Params, obs: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-task parameters ``[tasks, ...]`` on ``obs [tasks, N, obs_dim]``
    (:func:`metagrad.core.batched_forward`): ``mean [tasks, N, act_dim]`` and ``log_std``
    broadcastable against it."""
    mean, log_std = core.batched_forward(module, params, buffers, obs)
    return mean, _per_row(log_std, mean)


def expand_params(params: Params, tasks: int) -> Params:
    """``theta -> [tasks, ...]`` views of it (differentiable back to ``theta``)."""
    return {k: v.unsqueeze(0).expand(tasks, *v.shape) for k, v in params.items()}


def reinforce_losses(module: nn.Module, params: Params, buffers: Params, batch: PGBatch) -> Tensor:
    """``-mean_t(log pi(a_t|s_t) A_t)`` of each task under its own parameters, ``[tasks]``."""
    mean, log_std = task_distributions(module, params, buffers, batch.obs)
    logp = diag_gaussian_log_prob(batch.actions, mean, log_std)
    return -_task_mean(logp * batch.advantages, batch.mask)


_FIXED_RATES = Hyper({}, None)


def policy_gradient_step(
    module: nn.Module,
    params: Params,
    buffers: Params,
    batch: PGBatch,
    lr: float,
    *,
    first_order: bool = False,
) -> Params:
    """One policy-gradient step of every task's parameters ``[tasks, ...]`` on its paths.

    One :func:`metagrad.core.adapt` step (``autograd=True``) on ``sum_i L_i``: task ``i``'s
    REINFORCE loss reads only row ``i``, so row ``i`` of the gradient is its own. Second
    order (unless ``first_order``) when grad mode is on and ``params`` are in a graph: the
    result is then differentiable with respect to the meta-parameters through the inner
    gradients; otherwise they are constants (first-order MAML, or plain evaluation).
    """

    def loss(p: Params) -> Tensor:
        return reinforce_losses(module, p, buffers, batch).sum()

    # nothing in a graph: no meta-gradient to carry, so no second-order graph either
    first_order = first_order or not any(v.requires_grad for v in params.values())
    spec = Spec(adapts=tuple(params), steps=1, lr=lr, first_order=first_order)
    out = core.adapt(loss, params, spec, _FIXED_RATES, autograd=True)
    assert isinstance(out, dict)
    return out


def adapt(
    module: nn.Module,
    params: Params,
    buffers: Params,
    batches: Sequence[PGBatch],
    lrs: Sequence[float],
    *,
    first_order: bool = False,
) -> Params:
    """``theta`` (unbatched) adapted per task with step ``j`` on ``batches[j]`` (lr ``lrs[j]``).

    Every inner step has fresh paths and its own step size, so each is its own one-step
    :func:`policy_gradient_step`.
    """
    if len(batches) != len(lrs):
        raise ValueError(f"{len(batches)} batches for {len(lrs)} step sizes")
    if not batches:
        raise ValueError("adapt needs at least one batch (it fixes the number of tasks)")
    fast = expand_params(params, batches[0].num_tasks)
    return adapt_rows(module, fast, buffers, batches, lrs, first_order=first_order)


def adapt_rows(
    module: nn.Module,
    fast: Params,
    buffers: Params,
    batches: Sequence[PGBatch],
    lrs: Sequence[float],
    *,
    first_order: bool = False,
) -> Params:
    """:func:`adapt` from per-task parameters ``[tasks, ...]`` (none: ``fast`` itself)."""
    for batch, lr in zip(batches, lrs, strict=True):
        fast = policy_gradient_step(module, fast, buffers, batch, lr, first_order=first_order)
    return fast


class MetaObjective:
    """The post-update TRPO surrogate and KL as functions of the meta-parameters.

    Args:
        module: the policy (its parameter names and order define ``theta`` lists).
        inner: the batches of the inner steps (empty: no adaptation, as ``pretrain``).
        lrs: the inner step sizes, one per batch.
        post: the paths the objective is evaluated on (post-update, or pre-update when
            ``inner`` is empty), sampled by the "old" policy, i.e. the adaptation of the
            module's current parameters.
        first_order: treat the inner gradients as constants.
        total_tasks: the meta-batch's size when these batches hold one process's share of
            it: the surrogate and KL are then this share's sum over ``total_tasks`` (the
            processes' values add up to the means); default: the mean over these tasks.
    """

    def __init__(
        self,
        module: nn.Module,
        inner: Sequence[PGBatch],
        lrs: Sequence[float],
        post: PGBatch,
        *,
        first_order: bool = False,
        total_tasks: int | None = None,
    ) -> None:
        self.module = module
        self.names = [n for n, _ in module.named_parameters()]
        self.buffers = dict(module.named_buffers())
        dtype = next(module.parameters()).dtype
        self.inner = [b.to(dtype) for b in inner]
        self.lrs = list(lrs)
        self.post = post.to(dtype)
        self.first_order = first_order
        self.total_tasks = total_tasks
        with torch.no_grad():
            theta = [p.detach() for p in module.parameters()]
            mean, log_std = self.distribution(theta, graph=False)
        self.old_mean, self.old_log_std = mean, log_std
        self.old_logp = diag_gaussian_log_prob(self.post.actions, mean, log_std)

    def adapted(self, theta: Sequence[Tensor], graph: bool = True) -> Params:
        """Per-task post-update parameters ``[tasks, ...]`` from ``theta``."""
        params = dict(zip(self.names, theta, strict=True))
        return self._adapt_rows(expand_params(params, self.post.num_tasks), graph)

    def _adapt_rows(self, fast: Params, graph: bool) -> Params:
        first_order = self.first_order or not graph
        return adapt_rows(
            self.module, fast, self.buffers, self.inner, self.lrs, first_order=first_order
        )

    def distribution(self, theta: Sequence[Tensor], graph: bool = True) -> tuple[Tensor, Tensor]:
        """Post-update ``(mean, log_std)`` on the objective's observations."""
        fast = self.adapted(theta, graph)
        return task_distributions(self.module, fast, self.buffers, self.post.obs)

    def _over_tasks(self, per_task: Tensor) -> Tensor:
        if self.total_tasks is None:
            return per_task.mean()
        return per_task.sum() / self.total_tasks

    def _task_surrogates(self, mean: Tensor, log_std: Tensor) -> Tensor:
        logp = diag_gaussian_log_prob(self.post.actions, mean, log_std)
        ratio = torch.exp(logp - self.old_logp)
        return -_task_mean(ratio * self.post.advantages, self.post.mask)

    def _task_kls(self, mean: Tensor, log_std: Tensor) -> Tensor:
        kl = diag_gaussian_kl(self.old_mean, self.old_log_std, mean, log_std)
        return _task_mean(kl, self.post.mask)

    def _surrogate(self, mean: Tensor, log_std: Tensor) -> Tensor:
        return self._over_tasks(self._task_surrogates(mean, log_std))

    def _kl(self, mean: Tensor, log_std: Tensor) -> Tensor:
        return self._over_tasks(self._task_kls(mean, log_std))

    def _rows(self, per_task: Tensor) -> Tensor:
        """Each task's term of the objective (the terms sum to it)."""
        total = self.post.num_tasks if self.total_tasks is None else self.total_tasks
        return per_task / total

    def task_gradient(self, theta: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Each task's term of :meth:`surrogate` and its gradient in ``theta``:
        ``[tasks]`` and ``[tasks, P]`` (flat).

        Rows rather than their sum: summed in one fixed order (``rows.sum(0)``) they give
        the same floats whether one process holds every task or several hold a share each.
        """
        tasks = self.post.num_tasks
        x = [t.detach().unsqueeze(0).expand(tasks, *t.shape).requires_grad_(True) for t in theta]
        fast = self._adapt_rows(dict(zip(self.names, x, strict=True)), graph=True)
        mean, log_std = task_distributions(self.module, fast, self.buffers, self.post.obs)
        terms = self._rows(self._task_surrogates(mean, log_std))
        gs = torch.autograd.grad(terms.sum(), x, allow_unused=True, materialize_grads=True)
        return terms.detach(), torch.cat([g.reshape(tasks, -1) for g in gs], 1).detach()

    def task_scores(self, theta: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Each task's terms of :meth:`surrogate` and :meth:`kl` at ``theta`` (no graph)."""
        mean, log_std = self.distribution([t.detach() for t in theta], graph=False)
        with torch.no_grad():
            return (
                self._rows(self._task_surrogates(mean, log_std)),
                self._rows(self._task_kls(mean, log_std)),
            )

    def fisher_product(
        self, theta: Sequence[Tensor], damping: float = 0.0, *, rows: bool = False
    ) -> HVP:
        """``v -> F v + damping v``, ``F`` the Fisher matrix of the post-update policies in
        ``theta``: the Hessian of :meth:`kl` at the old policy (where TRPO takes it).
        ``rows``: return each task's term of ``F v``, ``[tasks, P]`` (``damping`` must then
        be 0: it is added once, after the sum).

        ``F = J^T M J`` with ``M`` the Gaussian's Fisher matrix in (mean, log_std) and ``J``
        the Jacobian of the post-update outputs, ``J = J_post (I - a_K H_K) ... (I - a_1 H_1)
        E``: ``E`` copies ``theta`` to every task, ``H_k`` is the Hessian of inner step
        ``k``'s loss, ``J_post`` the policy's Jacobian at the adapted parameters. The
        gradient graphs of the inner steps and the post-update forward are built once; a
        product is then one double backward per inner step each way and a Jacobian product
        each way through the post-update forward, with none of the third derivatives that
        differentiating :meth:`kl` twice carries (they vanish at the old policy).
        """
        if rows and damping:
            raise ValueError("rows=True takes no damping (add it to the sum of the rows)")
        tasks_here = self.post.num_tasks
        x = [t.detach().unsqueeze(0).expand(tasks_here, *t.shape) for t in theta]
        steps = []
        for batch, lr in zip(self.inner, self.lrs, strict=True):

            def loss(ps: Sequence[Tensor], batch: PGBatch = batch) -> Tensor:
                p = dict(zip(self.names, ps, strict=True))
                return reinforce_losses(self.module, p, self.buffers, batch).sum()

            x, jacobian = core.linalg.gradient_step_jacobian(loss, x, lr)
            if not self.first_order:  # first order: the inner gradients are constants
                steps.append(jacobian)
        fast = core.linalg.leaves(x)
        ys = task_distributions(
            self.module, dict(zip(self.names, fast, strict=True)), self.buffers, self.post.obs
        )
        # J_post v by the double-backward trick: J_post^T u is linear in u, its
        # derivative in u along v is J_post v
        us = [torch.zeros_like(y, requires_grad=True) for y in ys]
        jt_u = torch.autograd.grad(ys, fast, grad_outputs=us, create_graph=True)
        mask = self.post.mask
        tasks = tasks_here if self.total_tasks is None else self.total_tasks
        weight = (mask / mask.sum(-1, keepdim=True).clamp_min(1.0) / tasks).unsqueeze(-1)
        inv_var = torch.exp(-2.0 * self.old_log_std)
        ls_weight = _sum_to(2.0 * weight.expand(ys[0].shape), ys[1].shape)

        def product(v: Tensor) -> Tensor:
            # E v, then through the inner steps
            u = [
                t.unsqueeze(0).expand(tasks_here, *t.shape)
                for t in core.linalg.unflatten(v.to(ys[0].dtype), theta)
            ]
            for jacobian in steps:
                u = jacobian(u)
            d_mean, d_log_std = _grad_or_zeros(jt_u, us, u)
            # M: the Hessian of a diagonal Gaussian's KL in (mean, log_std) is 1/var and 2
            mjv = (d_mean * weight * inv_var, ls_weight * d_log_std)
            w = _grad_or_zeros(ys, fast, mjv)
            for jacobian in reversed(steps):
                w = jacobian(w)
            if rows:
                return torch.cat([t.reshape(tasks_here, -1) for t in w], 1).detach()
            return core.linalg.flatten([t.sum(0) for t in w]).detach() + damping * v

        return product

    def surrogate(self, theta: Sequence[Tensor]) -> Tensor:
        """The loss TRPO minimises (differentiable through the inner step)."""
        return self._surrogate(*self.distribution(theta))

    def kl(self, theta: Sequence[Tensor]) -> Tensor:
        """Mean over tasks of ``KL(old || new)`` (differentiable through the inner step)."""
        return self._kl(*self.distribution(theta))

    def evaluate(self, theta: Sequence[Tensor]) -> tuple[float, float]:
        """Surrogate and KL at ``theta`` without building a meta-gradient graph."""
        mean, log_std = self.distribution([t.detach() for t in theta], graph=False)
        with torch.no_grad():
            return float(self._surrogate(mean, log_std)), float(self._kl(mean, log_std))


def meta_trpo_step(
    objective: MetaObjective,
    *,
    max_kl: float = 0.01,
    damping: float = 1e-5,
    cg_iters: int = 10,
    backtrack_ratio: float = 0.8,
    max_backtracks: int = 15,
    hvp: Literal["exact", "finite_difference", "fisher"] = "fisher",
    fd_base_eps: float = 1.0,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> TRPOStepResult:
    """One TRPO step of the objective's module parameters (not applied; see ``params``).

    As :func:`metagrad.rl.trpo.trpo_step`, except that the line search evaluates the
    surrogate and the KL of a candidate together, with one inner step and no graph, and
    ``hvp="fisher"`` takes the KL Hessian as the Fisher matrix (:meth:`MetaObjective.fisher_product`).

    ``reduce`` (a sum of rows, see ``trpo_step``): the gradient, the Fisher products and the
    line-search scores are handed to it as one row per task, so the sum over tasks is
    taken in one order however the tasks are spread over processes.
    """
    rows = reduce is not None

    def fisher(theta: list[Tensor], damping: float) -> HVP:
        return objective.fisher_product(theta, damping, rows=rows)

    return trpo_step(
        objective.surrogate, objective.kl, list(objective.module.parameters()),
        max_kl=max_kl, damping=damping, cg_iters=cg_iters, backtrack_ratio=backtrack_ratio,
        max_backtracks=max_backtracks, fd_base_eps=fd_base_eps,
        evaluate=objective.task_scores if rows else objective.evaluate,
        hvp=fisher if hvp == "fisher" else hvp, reduce=reduce,
        gradient=objective.task_gradient if rows else None,
    )  # fmt: skip


def sum_rows(rows: Tensor) -> Tensor:
    """The sum of ``rows`` over its first dimension: one process's ``reduce``."""
    return rows.sum(0)


# --------------------------------------------------------------------------- module and loop
def reinforce_loss_fn(output: tuple[Tensor, Tensor], target: Tensor) -> Tensor:
    """REINFORCE loss in :class:`~metagrad.core.MAML`'s ``loss_fn(prediction, target)`` form.

    ``output = (mean [N, act_dim], log_std)``, ``target = [actions, advantages, mask]``
    concatenated along the last dimension (see :func:`reinforce_target`).
    """
    mean, log_std = output
    act_dim = mean.shape[-1]
    actions, adv, mask = target[..., :act_dim], target[..., act_dim], target[..., act_dim + 1]
    logp = diag_gaussian_log_prob(actions, mean, log_std)
    return -(logp * adv * mask).sum() / mask.sum().clamp_min(1.0)


def reinforce_target(actions: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """Pack one task's ``actions [N, act_dim]``, ``advantages [N]``, ``mask [N]`` as a target."""
    return torch.cat([actions, advantages.unsqueeze(-1), mask.unsqueeze(-1)], dim=-1)


class PolicyMAML(MAML):
    """A :class:`~metagrad.core.MAML` around a Gaussian policy with the REINFORCE loss.

    ``maml.model`` is the policy (``obs -> (mean, log_std)``); ``maml.adapt(obs,
    reinforce_target(actions, advantages, mask))`` takes one task's policy-gradient steps
    and returns the adapted policy. Meta-training (TRPO) is done by :class:`MAMLTRPO`.
    """

    def __init__(
        self,
        policy: nn.Module,
        inner_lr: float = 0.1,
        inner_steps: int = 1,
        first_order: bool = False,
    ) -> None:
        super().__init__(
            policy, reinforce_loss_fn, inner_lr=inner_lr, inner_steps=inner_steps,
            first_order=first_order, vectorize=True,
        )  # fmt: skip

    @property
    def policy(self) -> nn.Module:
        return self.model


@dataclass
class MAMLTRPO:
    """MAML-TRPO (or plain TRPO on the task distribution when ``adapt`` is false)."""

    inner_lr: float = 0.1
    inner_steps: int = 1
    first_order: bool = False
    adapt: bool = True
    gamma: float = 0.99
    gae_lambda: float = 1.0
    normalize_advantages: bool = True
    max_kl: float = 0.01
    cg_iters: int = 10
    cg_damping: float = 1e-5
    backtrack_ratio: float = 0.8
    max_backtracks: int = 15
    hvp: Literal["exact", "finite_difference", "fisher"] = "fisher"

    def process(self, traj: Trajectories) -> PGBatch:
        return process_trajectories(traj, self.gamma, self.gae_lambda, self.normalize_advantages)

    def step(
        self, policy: nn.Module, sampler: VectorSampler, tasks: Sequence[Task], rollouts: int,
        *, shard: tuple[int, int] | None = None, reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> dict[str, float]:  # fmt: skip
        """One meta-iteration on ``tasks``; updates ``policy``'s parameters in place.

        Several processes: each passes the whole meta-batch ``tasks``, its ``shard=(lo,
        hi)`` of it, and ``reduce`` (the sum of every process's rows in task order, e.g.
        :meth:`~metagrad.experiments.distributed.World.sum_rows`); each samples and adapts
        only its tasks, TRPO's per-task quantities are summed by ``reduce``, and every
        process takes the same step as one process on all of ``tasks``: the same floats,
        as one process sums the same rows in the same order (:func:`sum_rows`). The
        returned returns are the means over this process's tasks.
        """
        # each step allocates and frees tens of MB of activations: keep them for reuse
        keep_freed_memory()
        buffers = dict(policy.named_buffers())
        theta = {n: p.detach() for n, p in policy.named_parameters()}
        local = len(tasks) if shard is None else shard[1] - shard[0]
        inner: list[PGBatch] = []
        current = TaskBatchedPolicy(policy, expand_params(theta, local), buffers)
        steps = self.inner_steps if self.adapt else 0
        for _ in range(steps):
            inner.append(self.process(sampler.sample(current, tasks, rollouts, shard=shard)))
            with torch.no_grad():
                fast = adapt(policy, theta, buffers, inner, [self.inner_lr] * len(inner))
            current = TaskBatchedPolicy(policy, fast, buffers)
        post = self.process(sampler.sample(current, tasks, rollouts, shard=shard))
        objective = MetaObjective(
            policy, inner, [self.inner_lr] * len(inner), post, first_order=self.first_order,
            total_tasks=len(tasks),
        )  # fmt: skip
        result = meta_trpo_step(
            objective, max_kl=self.max_kl, damping=self.cg_damping, cg_iters=self.cg_iters,
            backtrack_ratio=self.backtrack_ratio, max_backtracks=self.max_backtracks,
            hvp=self.hvp, reduce=reduce or sum_rows,
        )  # fmt: skip
        with torch.no_grad():
            for p, new in zip(policy.parameters(), result.params, strict=True):
                p.copy_(new)
        metrics: dict[str, float] = {
            "return_pre": float((inner[0] if inner else post).returns.mean())
        }
        if inner:
            metrics["return_post"] = float(post.returns.mean())
        metrics |= {
            "kl": result.kl_after if result.accepted else 0.0,
            "improvement": result.loss_before - result.loss_after if result.accepted else 0.0,
            "accepted": float(result.accepted),
        }
        return metrics

    def adaptation_returns(
        self,
        policy: nn.Module,
        sampler: VectorSampler,
        tasks: Sequence[Task],
        rollouts: int,
        lrs: Sequence[float],
        initial: Params | None = None,
    ) -> Tensor:
        """Average return per path of each task after ``0..len(lrs)`` policy-gradient steps.

        Step ``j`` uses fresh paths of the policy adapted so far and step size ``lrs[j]``.
        ``initial``: per-task starting parameters ``{name: [tasks, ...]}`` (the random
        baseline: a fresh policy per task); default ``policy``'s own for every task.
        Returns ``[tasks, len(lrs) + 1]``.
        """
        buffers = dict(policy.named_buffers())
        if initial is None:
            initial = expand_params({n: p.detach() for n, p in policy.named_parameters()}, len(tasks))  # fmt: skip
        fast = {n: t.detach() for n, t in initial.items()}
        curve = []
        for j in range(len(lrs) + 1):
            batch = self.process(
                sampler.sample(TaskBatchedPolicy(policy, fast, buffers), tasks, rollouts)
            )
            curve.append(batch.returns)
            if j < len(lrs):
                with torch.no_grad():
                    fast = policy_gradient_step(
                        policy, fast, buffers, batch, lrs[j], first_order=True
                    )
        return torch.stack(curve, dim=1)


def task_features(task: dict[str, Any]) -> list[float]:
    """The numbers that define a task (goal, velocity or direction), for oracle policies."""
    out: list[float] = []
    for key in sorted(task):
        value = task[key]
        if isinstance(value, list | tuple):
            out.extend(float(v) for v in value)
        else:
            out.append(float(value))
    return out
