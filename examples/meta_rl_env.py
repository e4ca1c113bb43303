"""Meta-reinforcement learning on your own gymnasium environment, with MAML-TRPO.

What it shows: the task interface metagrad's sampler expects from an environment
(``sample_tasks(n, rng)``, ``set_task(task)``, a task through ``reset(options={"task":
...})``); registering the environment under your own gymnasium ID; meta-training with
``metagrad.rl.VectorSampler``, ``GaussianMLPPolicy`` and ``MAMLTRPO``; the test protocol
(returns before and after one policy-gradient step on new tasks), against the same policy
before meta-training.

The environment: a point in the plane starts at the origin and must reach a goal on a ring
of radius 0.5; the task is the goal's angle. The reward is minus the distance to the goal,
so a policy that does not know the goal can only wait at the centre; one policy-gradient
step on a few paths should send it towards the goal.

    python examples/meta_rl_env.py             # needs the rl extra: pip install -e '.[rl]'
    python examples/meta_rl_env.py --smoke     # tiny sizes, a few seconds
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import gymnasium
import numpy as np
import torch
from gymnasium import spaces

from metagrad.rl import GaussianMLPPolicy, VectorSampler
from metagrad.rl.maml_trpo import MAMLTRPO

ENV_ID = "examples/GoalOnRing-v0"


class GoalOnRingEnv(gymnasium.Env):
    """A point moved by ``0.1 * clip(action, -1, 1)`` per step towards a goal at
    ``radius * (cos a, sin a)``; the task is ``{"angle": a}``, the reward ``-distance``."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, radius: float = 0.5) -> None:
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.radius = radius
        self.goal: np.ndarray | None = None
        self.pos = np.zeros(2)

    # -- the task interface: the sampler draws tasks, then sets one per env before reset
    @staticmethod
    def sample_tasks(n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
        """``n`` tasks; every random number from ``rng``, so a seed gives the same tasks."""
        return [{"angle": float(a)} for a in rng.uniform(0.0, 2 * math.pi, size=n)]

    def set_task(self, task: dict[str, Any]) -> None:
        a = task["angle"]
        self.goal = self.radius * np.array([math.cos(a), math.sin(a)])

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if options is not None and "task" in options:
            self.set_task(options["task"])
        if self.goal is None:  # never given a task: draw one, as a plain gymnasium env would
            self.set_task(self.sample_tasks(1, self.np_random)[0])
        self.pos = np.zeros(2)
        return self.pos.astype(np.float32), {}

    def step(self, action: np.ndarray):
        assert self.goal is not None, "call reset() first"
        self.pos = self.pos + 0.1 * np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        distance = float(np.linalg.norm(self.pos - self.goal))
        # the sampler applies the horizon itself (max_episode_steps below)
        return self.pos.astype(np.float32), -distance, distance < 0.01, False, {}


def register() -> None:
    if ENV_ID not in gymnasium.registry:
        gymnasium.register(id=ENV_ID, entry_point=GoalOnRingEnv, max_episode_steps=20)


def mean_ci(x: torch.Tensor) -> str:
    return f"{x.mean().item():7.2f} +- {1.96 * x.std().item() / math.sqrt(len(x)):.2f}"


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--meta-batch", type=int, default=20, help="tasks per meta-iteration")
    parser.add_argument("--rollouts", type=int, default=10, help="paths per task and policy")
    parser.add_argument("--inner-lr", type=float, default=0.1)
    parser.add_argument("--test-tasks", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.iterations, args.meta_batch, args.rollouts, args.test_tasks = 2, 4, 2, 4
    register()
    torch.manual_seed(args.seed)

    # in-process sampler: one env per path, one batched policy forward per time step
    sampler = VectorSampler(ENV_ID, seed=args.seed)
    policy = GaussianMLPPolicy(sampler.obs_dim, sampler.act_dim, hidden_sizes=(64, 64))
    initial = GaussianMLPPolicy(sampler.obs_dim, sampler.act_dim, hidden_sizes=(64, 64))
    initial.load_state_dict(policy.state_dict())  # the random baseline: the same start
    # one REINFORCE step of inner_lr per task, TRPO on the post-update returns
    algo = MAMLTRPO(inner_lr=args.inner_lr, max_kl=0.01)
    rng = np.random.default_rng(args.seed)
    for it in range(1, args.iterations + 1):
        tasks = sampler.sample_tasks(args.meta_batch, rng)
        m = algo.step(policy, sampler, tasks, args.rollouts)  # updates policy in place
        if it % max(args.iterations // 10, 1) == 0 or it == 1:
            print(f"iteration {it:4d}  return before adaptation {m['return_pre']:7.2f}, "
                  f"after one step {m['return_post']:7.2f}")  # fmt: skip

    # new tasks; fresh paths before and after one step, the same noise for both policies
    test_tasks = sampler.sample_tasks(args.test_tasks, np.random.default_rng(args.seed + 1))
    print(f"{args.test_tasks} test tasks, average return per path (mean +- 95% CI):")
    out: dict[str, float] = {}
    for name, net in (("meta-trained", policy), ("not meta-trained", initial)):
        evaluation = VectorSampler(ENV_ID, seed=1234)
        returns = algo.adaptation_returns(net, evaluation, test_tasks, args.rollouts, [args.inner_lr])  # fmt: skip
        evaluation.close()
        print(f"  {name:<17} before {mean_ci(returns[:, 0])}   after one step {mean_ci(returns[:, 1])}")  # fmt: skip
        out[name] = returns[:, 1].mean().item()
    assert all(math.isfinite(v) for v in out.values())
    return out


if __name__ == "__main__":
    main()
