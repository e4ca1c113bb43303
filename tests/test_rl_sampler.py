"""Vectorised sampler: shapes, masks, consistency with the env, determinism, workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from metagrad.rl.policy import FunctionalPolicy, GaussianMLPPolicy  # noqa: E402
from metagrad.rl.sampler import Trajectories, VectorSampler  # noqa: E402

NAV = "metagrad/Navigation2D-v0"


def random_policy(obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(obs.shape[0], 2), torch.full((2,), -2.0)


def _check_navigation(tr: Trajectories, tasks: list[dict], k: int) -> None:
    n, horizon = len(tasks) * k, 100
    assert tr.obs.shape == (n, horizon, 2) and tr.obs.dtype == torch.float32
    assert tr.actions.shape == (n, horizon, 2)
    assert tr.rewards.shape == tr.mask.shape == (n, horizon)
    assert torch.equal(tr.task_index, torch.arange(n) // k)
    assert torch.equal(tr.mask.sum(1).long(), tr.lengths)
    assert torch.equal(tr.mask, (torch.arange(horizon)[None] < tr.lengths[:, None]).float())
    for name in ("obs", "actions", "rewards"):
        t = getattr(tr, name)
        pad = tr.mask == 0
        assert torch.all(t[pad] == 0), name
    assert torch.all(tr.obs[:, 0] == 0)  # every path starts at the origin
    # Dynamics and reward recomputed from the stored data.
    clipped = 0.1 * tr.actions.double().clamp(-1, 1)
    pos = torch.cumsum(clipped, dim=1)
    valid = tr.mask[:, 1:] > 0
    torch.testing.assert_close(tr.obs[:, 1:][valid], pos[:, :-1][valid].float())
    goals = torch.tensor([tasks[int(i)]["goal"] for i in tr.task_index], dtype=torch.float64)
    dist = (pos - goals[:, None]).norm(dim=-1)
    m = tr.mask > 0
    torch.testing.assert_close(tr.rewards[m].double(), -dist[m], atol=1e-6, rtol=1e-6)
    assert tr.num_steps == int(tr.mask.sum())


def test_navigation_shapes_masks_and_determinism() -> None:
    sampler = VectorSampler(NAV, seed=0)
    tasks = sampler.sample_tasks(3)
    tr = sampler.sample(random_policy, tasks, paths_per_task=4)
    _check_navigation(tr, tasks, 4)
    assert not tr.terminated.any() and torch.all(tr.lengths == 100)
    # Same seed -> same tasks and paths; a different seed -> different paths.
    again = VectorSampler(NAV, seed=0)
    tasks2 = again.sample_tasks(3)
    assert tasks2 == tasks
    tr2 = again.sample(random_policy, tasks2, paths_per_task=4)
    for name in ("obs", "actions", "rewards", "mask"):
        assert torch.equal(getattr(tr, name), getattr(tr2, name))
    other = VectorSampler(NAV, seed=1).sample(random_policy, tasks, paths_per_task=4)
    assert not torch.equal(other.actions, tr.actions)
    # Consecutive calls draw fresh noise.
    assert not torch.equal(sampler.sample(random_policy, tasks, 4).actions, tr.actions)


def test_navigation_termination_masks() -> None:
    goal = np.array([0.15, -0.05])
    tasks = [{"goal": goal.tolist()}, {"goal": [0.5, 0.5]}]

    def to_goal(obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Heads for the first goal: reaches it (within 0.01) at the second step.
        return (torch.tensor(goal, dtype=torch.float32) - obs) / 0.1, torch.zeros(2)

    tr = VectorSampler(NAV, seed=3).sample(to_goal, tasks, paths_per_task=2, deterministic=True)
    _check_navigation(tr, tasks, 2)
    assert tr.lengths.tolist() == [2, 2, 100, 100]
    assert tr.terminated.tolist() == [True, True, False, False]
    assert torch.all(tr.mask[:2, 2:] == 0) and torch.all(tr.mask[:2, :2] == 1)
    part = tr.task_slice(1)
    assert part.obs.shape[0] == 2 and part.tasks == [tasks[1]]


def test_mlp_policy_and_functional_policy_on_half_cheetah() -> None:
    sampler = VectorSampler("metagrad/HalfCheetahDir-v0", max_path_length=12, seed=0)
    assert (sampler.obs_dim, sampler.act_dim) == (17, 6)
    policy = GaussianMLPPolicy(17, 6)
    tasks = [{"direction": 1.0}, {"direction": -1.0}]
    tr = sampler.sample(policy, tasks, paths_per_task=2)
    assert tr.obs.shape == (4, 12, 17) and torch.all(tr.mask == 1)
    params = {k: v * 1.0 for k, v in policy.named_parameters()}  # non-leaf, like adapted ones
    tr2 = sampler.sample(FunctionalPolicy(policy, params), tasks, paths_per_task=2)
    assert torch.isfinite(tr2.rewards).all() and not tr2.actions.requires_grad


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_workers_match_in_process(start_method: str) -> None:
    policy = GaussianMLPPolicy(2, 2)
    with VectorSampler(NAV, seed=5, num_workers=2, start_method=start_method) as workers:
        tasks = workers.sample_tasks(3)
        tr_w = workers.sample(policy, tasks, paths_per_task=3)
        tr_w2 = workers.sample(policy, tasks, paths_per_task=1)  # fewer paths than before
        assert tr_w2.obs.shape[0] == 3
    local = VectorSampler(NAV, seed=5)
    assert local.sample_tasks(3) == tasks
    tr = local.sample(policy, tasks, paths_per_task=3)
    _check_navigation(tr_w, tasks, 3)
    for name in ("obs", "actions", "rewards", "mask"):
        torch.testing.assert_close(getattr(tr_w, name), getattr(tr, name))


def test_a_shard_gets_the_paths_it_gets_in_the_whole_batch() -> None:
    # several processes each sample their tasks' paths: together, one process's paths
    rng = np.random.default_rng(0)
    tasks = VectorSampler(NAV, max_path_length=12).sample_tasks(5, rng)
    policy = GaussianMLPPolicy(2, 2, (8,))
    whole = VectorSampler(NAV, max_path_length=12, seed=3).sample(policy, tasks, 3)
    part = VectorSampler(NAV, max_path_length=12, seed=3).sample(policy, tasks, 3, shard=(1, 4))
    rows = slice(3, 12)
    for name in ("obs", "actions", "rewards", "mask", "lengths"):
        assert torch.equal(getattr(part, name), getattr(whole, name)[rows]), name
    assert part.tasks == tasks[1:4] and torch.equal(part.task_index, torch.arange(9) // 3)
    with pytest.raises(ValueError, match="shard"):
        VectorSampler(NAV, max_path_length=12).sample(policy, tasks, 3, shard=(4, 4))
