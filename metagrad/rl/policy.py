"""Gaussian MLP policy and diagonal-Gaussian formulas in plain torch ops.

:class:`GaussianMLPPolicy` maps observations to ``(mean, log_std)``: an MLP (two hidden
layers of 100 ReLU units by default, as in MAML's locomotion and navigation experiments)
gives the mean, and ``log_std`` is a learned state-independent parameter vector
(initialised to 0, i.e. unit standard deviation). Its ``forward`` is a pure function of
its parameters, so ``torch.func.functional_call`` (or :func:`metagrad.core.functional.forward`)
runs it on an adapted ``params`` dict; :class:`FunctionalPolicy` binds a module to such
a dict as the ``obs -> (mean, log_std)`` callable the sampler takes, and
:class:`TaskBatchedPolicy` binds it to one parameter set per task (stacked along a
leading task dimension) as a per-task policy that runs all tasks in one ``vmap`` call.

Weights are Glorot-uniform with zero biases (rllab's TF layers default). The formulas
below (log-density, entropy, KL) are written out rather than taken from
``torch.distributions`` so they compose with ``torch.func`` transforms and double
backward without surprises; all reduce over the last (action) dimension, and
``log_std`` broadcasts against ``mean``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..core import batched_forward, forward

PolicyFn = Callable[[Tensor], tuple[Tensor, Tensor]]
"""An ``obs [N, obs_dim] -> (mean [N, act_dim], log_std [act_dim] or [N, act_dim])`` map."""

_LOG_2PI = math.log(2.0 * math.pi)


class GaussianMLPPolicy(nn.Module):
    """``obs -> (mean, log_std)`` with an MLP mean and a state-independent ``log_std``."""

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden_sizes: Sequence[int] = (100, 100),
        activation: type[nn.Module] = nn.ReLU,
        init_log_std: float = 0.0,
    ) -> None:
        super().__init__()
        self.obs_dim = obs_dim
        self.act_dim = act_dim
        layers: list[nn.Module] = []
        last = obs_dim
        for size in hidden_sizes:
            layers += [nn.Linear(last, size), activation()]
            last = size
        layers.append(nn.Linear(last, act_dim))
        self.mean_net = nn.Sequential(*layers)
        self.log_std = nn.Parameter(torch.full((act_dim,), float(init_log_std)))
        for m in self.mean_net:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """Mean ``[..., act_dim]`` and ``log_std`` ``[act_dim]`` (not expanded)."""
        return self.mean_net(obs), self.log_std


class FunctionalPolicy:
    """A policy module bound to a parameter dict: ``obs -> (mean, log_std)``.

    ``params`` may be adapted (non-leaf) tensors; :meth:`detached` gives a copy safe to
    send to sampler worker processes.
    """

    def __init__(
        self, module: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor] | None = None
    ) -> None:
        self.module = module
        self.params = params
        self.buffers = buffers if buffers is not None else dict(module.named_buffers())

    def __call__(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        return forward(self.module, self.params, self.buffers, obs)  # type: ignore[return-value]

    def detached(self) -> FunctionalPolicy:
        return FunctionalPolicy(
            self.module,
            {k: v.detach() for k, v in self.params.items()},
            {k: v.detach() for k, v in self.buffers.items()},
        )


class TaskBatchedPolicy:
    """A policy module with one parameter set per task: ``(obs, task_ids) -> (mean, log_std)``.

    ``params`` hold a leading task dimension (``[tasks, *shape]``). A call scatters the
    rows into a padded ``[tasks, rows_per_task, obs_dim]`` batch, runs the module on all
    tasks at once (:func:`metagrad.core.batched_forward`, ``vmap``) and gathers the rows
    back, so rollouts with a different (e.g. adapted) policy per task still cost one
    batched forward per time step.
    The sampler recognises it by ``per_task = True``.
    """

    per_task = True

    def __init__(
        self, module: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor] | None = None
    ) -> None:
        self.module = module
        self.params = params
        self.buffers = buffers if buffers is not None else dict(module.named_buffers())
        sizes = {v.shape[0] for v in params.values()}
        if len(sizes) != 1:
            raise ValueError(f"parameters disagree on the number of tasks: {sorted(sizes)}")
        self.num_tasks = sizes.pop()

    def forward_tasks(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """``obs [tasks, N, obs_dim]`` -> mean ``[tasks, N, act_dim]``, log_std ``[tasks, ...]``."""
        return batched_forward(self.module, self.params, self.buffers, obs)  # type: ignore[return-value]

    def __call__(self, obs: Tensor, task_ids: Tensor) -> tuple[Tensor, Tensor]:
        task_ids = task_ids.long()
        n = task_ids.numel()
        if n and n % self.num_tasks == 0:  # every task's rows, in order: no scatter needed
            per_task = n // self.num_tasks
            if torch.equal(task_ids, torch.arange(n) // per_task):
                mean, log_std = self.forward_tasks(obs.reshape(self.num_tasks, per_task, -1))
                mean = mean.reshape(n, -1)
                log_std = log_std.repeat_interleave(per_task, 0) if log_std.dim() == 2 else log_std.reshape(n, -1)  # fmt: skip
                return mean, log_std
        counts = torch.bincount(task_ids, minlength=self.num_tasks)
        order = torch.argsort(task_ids, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(task_ids)
        slot[order] = torch.arange(task_ids.numel()) - starts[task_ids[order]]
        width = int(counts.max()) if task_ids.numel() else 0
        padded = obs.new_zeros(self.num_tasks, width, obs.shape[-1])
        padded[task_ids, slot] = obs
        mean, log_std = self.forward_tasks(padded)
        mean = mean[task_ids, slot]
        log_std = log_std[task_ids] if log_std.dim() == 2 else log_std[task_ids, slot]
        return mean, log_std

    def detached(self) -> TaskBatchedPolicy:
        return TaskBatchedPolicy(
            self.module,
            {k: v.detach() for k, v in self.params.items()},
            {k: v.detach() for k, v in self.buffers.items()},
        )


def diag_gaussian_log_prob(actions: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """``log N(actions; mean, diag(exp(log_std)^2))`` summed over the last dimension."""
    z = (actions - mean) * torch.exp(-log_std)
    per_dim = -0.5 * z.pow(2) - log_std - 0.5 * _LOG_2PI
    return per_dim.sum(-1)


def diag_gaussian_entropy(log_std: Tensor, mean: Tensor | None = None) -> Tensor:
    """Entropy of a diagonal Gaussian, summed over the last dimension.

    ``mean`` only supplies the batch shape (the entropy does not depend on it).
    """
    if mean is not None:
        log_std = log_std.expand_as(mean)
    return (log_std + 0.5 * (_LOG_2PI + 1.0)).sum(-1)


def diag_gaussian_kl(
    mean_p: Tensor, log_std_p: Tensor, mean_q: Tensor, log_std_q: Tensor
) -> Tensor:
    """``KL(p || q)`` between diagonal Gaussians, summed over the last dimension.

    TRPO's constraint is ``KL(old || new)``: pass the old policy's outputs as ``p``.
    """
    var_ratio = torch.exp(2.0 * (log_std_p - log_std_q))
    mean_term = (mean_p - mean_q).pow(2) * torch.exp(-2.0 * log_std_q)
    per_dim = 0.5 * (var_ratio + mean_term - 1.0) + log_std_q - log_std_p
    return per_dim.sum(-1)


def sample_actions(
    policy: PolicyFn, obs: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Draw ``mean + exp(log_std) * eps`` without tracking gradients."""
    with torch.no_grad():
        mean, log_std = policy(obs)
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return mean + torch.exp(log_std) * eps
