"""Discounted returns, GAE and per-task advantage normalisation on padded batches.

All functions take ``[paths, T]`` tensors and a ``mask [paths, T]`` that is 1 on the
valid steps of each path (a prefix: paths end by termination or at the horizon) and 0
on padding. Outputs are 0 on padding. Following rllab, nothing is bootstrapped past
the end of a path (the value after the last step is 0) unless ``last_values`` is given.

The loops run over time (``T`` iterations of ``[paths]``-wide ops), not over paths.
"""

from __future__ import annotations

import torch
from torch import Tensor


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 0.99) -> Tensor:
    """``R_t = sum_{k >= t} gamma^(k - t) r_k`` within each path."""
    mask = mask.to(rewards.dtype)
    r = rewards * mask
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        running = r[:, t] + gamma * running * mask[:, t]
        out[:, t] = running
    return out * mask


def gae_advantages(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 0.99,
    lam: float = 1.0,
    last_values: Tensor | None = None,
) -> Tensor:
    """Generalised advantage estimates ``A_t = sum_k (gamma lam)^k delta_{t+k}``.

    ``delta_t = r_t + gamma V_{t+1} - V_t`` with ``V`` after a path's last step taken as
    ``last_values [paths]`` (default 0, as rllab). With ``lam = 1`` and no
    ``last_values`` this is ``discounted_returns - values``.
    """
    mask = mask.to(rewards.dtype)
    v = values.to(rewards.dtype) * mask
    next_v = torch.zeros_like(v)
    next_v[:, :-1] = v[:, 1:]
    if last_values is not None:
        next_mask = torch.zeros_like(mask)
        next_mask[:, :-1] = mask[:, 1:]
        is_last = mask * (1.0 - next_mask)
        next_v = next_v + is_last * last_values.to(rewards.dtype).unsqueeze(-1)
    deltas = (rewards + gamma * next_v - v) * mask
    out = torch.zeros_like(deltas)
    running = torch.zeros_like(deltas[:, 0])
    for t in range(deltas.shape[1] - 1, -1, -1):
        running = deltas[:, t] + gamma * lam * running * mask[:, t]
        out[:, t] = running
    return out * mask


def normalize_advantages(
    advantages: Tensor,
    mask: Tensor,
    task_index: Tensor | None = None,
    center: bool = True,
    scale: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """``(A - mean) / (std + eps)`` over the valid steps of each task's paths.

    ``std`` is the population standard deviation (numpy's default, as rllab's
    ``center_adv``). Without ``task_index`` all paths form one task.
    """
    mask = mask.to(advantages.dtype)
    paths = advantages.shape[0]
    if task_index is None:
        task_index = torch.zeros(paths, dtype=torch.long, device=advantages.device)
    task_index = task_index.long()
    n_tasks = int(task_index.max().item()) + 1 if paths else 0
    count = advantages.new_zeros(n_tasks).index_add_(0, task_index, mask.sum(1))
    count = count.clamp_min(1.0)
    total = advantages.new_zeros(n_tasks).index_add_(0, task_index, (advantages * mask).sum(1))
    mean = (total / count)[task_index].unsqueeze(-1)
    out = advantages - mean if center else advantages
    if scale:
        sq = ((advantages - mean) ** 2 * mask).sum(1)
        var = advantages.new_zeros(n_tasks).index_add_(0, task_index, sq) / count
        out = out / (var.sqrt()[task_index].unsqueeze(-1) + eps)
    return out * mask
