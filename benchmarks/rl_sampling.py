"""Sampling throughput of ``metagrad.rl.VectorSampler`` against raw ``env.step``.

Run: ``python benchmarks/rl_sampling.py [--quick]``. Prints env steps per second for

* ``raw``: one ``env.unwrapped`` stepped in a Python loop with precomputed random
  actions (the ceiling for any in-process sampler: no policy, no bookkeeping);
* ``sampler``: :class:`VectorSampler` in-process with a 100-100 Gaussian MLP policy
  (one batched forward per time step, 1 torch thread);
* ``sampler(threads=N)``: the same with torch's default intra-op threads;
* ``workers=2``: the same batch split over 2 worker processes (startup excluded).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from metagrad.rl import GaussianMLPPolicy, VectorSampler
from metagrad.rl.sampler import make_env


def raw_steps_per_s(env_id: str, steps: int) -> float:
    env = make_env(env_id).unwrapped
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    low, high = env.action_space.low, env.action_space.high
    actions = rng.uniform(low, high, size=(steps, *env.action_space.shape))
    t0 = time.perf_counter()
    for a in actions:
        _, _, term, _, _ = env.step(a)
        if term:
            env.reset()
    return steps / (time.perf_counter() - t0)


def sampler_steps_per_s(
    env_id: str, tasks: int, paths: int, repeats: int, **kwargs: object
) -> float:
    with VectorSampler(env_id, seed=0, **kwargs) as sampler:  # type: ignore[arg-type]
        policy = GaussianMLPPolicy(sampler.obs_dim, sampler.act_dim)
        task_list = sampler.sample_tasks(tasks)
        sampler.sample(policy, task_list, 1)  # warm up (worker startup, env creation)
        sampler.sample(policy, task_list, paths)
        best = 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            tr = sampler.sample(policy, task_list, paths)
            best = max(best, tr.num_steps / (time.perf_counter() - t0))
        return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches, 1 repeat")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    configs = {
        # env id: (tasks, paths per task) -- MAML used 20 tasks x 20 paths (2D nav.)
        # and 40 tasks x 20 paths (locomotion); smaller here to keep the run short.
        "metagrad/Navigation2D-v0": (20, 20),
        "metagrad/HalfCheetahVel-v0": (10, 10) if not args.quick else (4, 5),
        "metagrad/AntVel-v0": (10, 10) if not args.quick else (4, 5),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} default threads")
    for env_id, (tasks, paths) in configs.items():
        raw = raw_steps_per_s(env_id, 20000)
        rows = {
            "raw env.step": raw,
            f"sampler {tasks}x{paths}": sampler_steps_per_s(env_id, tasks, paths, repeats),
            f"sampler {tasks}x{paths} (threads={torch.get_num_threads()})": sampler_steps_per_s(
                env_id, tasks, paths, repeats, num_threads=None
            ),
            f"sampler {tasks}x{paths} workers=2": sampler_steps_per_s(
                env_id, tasks, paths, repeats, num_workers=2
            ),
        }
        print(env_id)
        for name, rate in rows.items():
            print(f"  {name:<40s} {rate:>10.0f} steps/s  ({rate / raw:5.2f} x raw)")


if __name__ == "__main__":
    main()
