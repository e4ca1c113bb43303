"""Vectorised rollouts for meta-RL: many envs, one batched policy forward per step.

:class:`VectorSampler` keeps a pool of env instances of one gymnasium ID and, for a
list of ``tasks`` and ``paths_per_task``, runs ``len(tasks) * paths_per_task`` paths
side by side, task-major (paths ``i * K .. i * K + K - 1`` belong to ``tasks[i]``). At
each time step the observations of the still-running paths go through the policy in
one call; paths that terminate drop out. The result is a :class:`Trajectories` of
padded tensors with a mask.

The policy is any callable ``obs [N, obs_dim] -> (mean [N, act_dim], log_std)``, e.g.
the module :class:`~metagrad.rl.policy.GaussianMLPPolicy` itself or a
:class:`~metagrad.rl.policy.FunctionalPolicy` bound to adapted parameters. A *per-task*
policy (an object with a true ``per_task`` attribute, e.g.
:class:`~metagrad.rl.policy.TaskBatchedPolicy`: one parameter set per task, as MAML's
post-update sampling needs) is called as ``policy(obs, task_ids)`` with the task index
(into ``tasks``) of every row, still once per time step for all running paths; a plain
list of callables, one per task, is accepted too (one call per task and step). Actions are
``mean + exp(log_std) * eps``; the stored actions are these unclipped samples (the
envs clip), so their log-probabilities are the ones the policy gradient needs.

Threads: the per-step policy calls are small (``[paths, obs_dim]`` through a 100-unit
MLP). With torch's default 2 intra-op threads on a busy 2-core machine they ran
10-100x slower than with one (OpenMP oversubscription; whole sampling 8-17x slower in
``benchmarks/rl_sampling.py``), so the in-process rollout runs with ``num_threads=1``
torch threads (restored afterwards; ``None`` leaves the setting alone).

Determinism: each :meth:`VectorSampler.sample` call draws the reset seed of every path
and the noise ``eps [paths, T, act_dim]`` from the sampler's generator (``seed``), so
a sampler built with the same seed gives the same batches, with or without workers.
``task_features`` (a picklable ``task -> sequence of floats``) appends those numbers to
every observation of a path of that task: the "oracle" policy of MAML's RL experiments
sees its goal. Envs are used through ``env.unwrapped``; the sampler applies the horizon itself
(``max_path_length``, default the ID's ``max_episode_steps``) and treats a path ending
at the horizon as not terminated. An env class with a static ``step_many(envs, actions) ->
(obs, rewards, terminated, truncated)`` (arrays over the envs; Navigation2DEnv has one) is
stepped with one call per time step instead of one ``step`` per env.

Worker mode (``num_workers > 0``): persistent processes each own a contiguous slice
of the paths and their envs; every ``sample`` call sends each worker the policy
(pickled, so its weights travel each iteration; a :class:`FunctionalPolicy` is
detached first), its tasks, seeds and noise, and gets whole padded trajectories back.
Each worker runs its policy forward with one torch thread. Whether it pays depends on
how expensive ``env.step`` is relative to the per-step policy call and on free cores:
see ``benchmarks/rl_sampling.py``.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import gymnasium
import numpy as np
import torch
from torch import Tensor

from .policy import PolicyFn

Task = dict[str, Any]
TaskFeatures = Callable[[Task], Sequence[float]]


class PolicyList:
    """One ``obs -> (mean, log_std)`` callable per task, as a per-task policy.

    Called as ``policy(obs, task_ids)``; rows of each task go through that task's
    policy (one call per task present), so prefer a batched per-task policy such as
    :class:`~metagrad.rl.policy.TaskBatchedPolicy` when speed matters.
    """

    per_task = True

    def __init__(self, policies: Sequence[PolicyFn]) -> None:
        self.policies = list(policies)

    def __call__(self, obs: Tensor, task_ids: Tensor) -> tuple[Tensor, Tensor]:
        mean: Tensor | None = None
        log_std: Tensor | None = None
        for t in torch.unique(task_ids).tolist():
            rows = (task_ids == t).nonzero().squeeze(-1)
            m, ls = self.policies[t](obs[rows])
            if mean is None or log_std is None:
                mean = m.new_zeros(obs.shape[0], m.shape[-1])
                log_std = m.new_zeros(obs.shape[0], m.shape[-1])
            mean[rows] = m
            log_std[rows] = ls.expand_as(m).to(m.dtype)
        assert mean is not None and log_std is not None, "no rows"
        return mean, log_std

    def detached(self) -> PolicyList:
        return PolicyList([getattr(p, "detached", lambda p=p: p)() for p in self.policies])


def _call_policy(policy: Any, obs: Tensor, task_ids: Tensor) -> tuple[Tensor, Tensor]:
    if getattr(policy, "per_task", False):
        return policy(obs, task_ids)
    return policy(obs)


@dataclass
class Trajectories:
    """A padded batch of paths; ``mask[p, t] = 1`` for the valid steps of path ``p``."""

    obs: Tensor  # [paths, T, obs_dim] float32, observation at which action t was taken
    actions: Tensor  # [paths, T, act_dim] float32, unclipped policy samples
    rewards: Tensor  # [paths, T] float32
    mask: Tensor  # [paths, T] float32
    task_index: Tensor  # [paths] long, index into ``tasks``
    lengths: Tensor  # [paths] long
    terminated: Tensor  # [paths] bool, ended by the env rather than the horizon
    tasks: list[Task]

    @property
    def num_steps(self) -> int:
        return int(self.lengths.sum())

    def task_slice(self, i: int) -> Trajectories:
        """The paths of ``tasks[i]`` (a view when paths are task-major)."""
        sel = (self.task_index == i).nonzero().squeeze(-1)
        return Trajectories(
            self.obs[sel], self.actions[sel], self.rewards[sel], self.mask[sel],
            torch.zeros_like(sel), self.lengths[sel], self.terminated[sel], [self.tasks[i]],
        )  # fmt: skip


def make_env(env_id: str, env_kwargs: dict[str, Any] | None = None) -> gymnasium.Env:
    """``gymnasium.make(env_id, **env_kwargs)`` (``metagrad.rl`` registers its IDs)."""
    import metagrad.rl  # noqa: F401  (registration)

    return gymnasium.make(env_id, disable_env_checker=True, **(env_kwargs or {}))


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run torch ops with ``n`` intra-op threads inside the block (``None``: unchanged)."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rollout(
    envs: Sequence[gymnasium.Env],
    tasks: Sequence[Task],
    seeds: Sequence[int],
    policy: PolicyFn,
    noise: Tensor,
    max_path_length: int,
    task_ids: Sequence[int] | np.ndarray | None = None,
    extra_obs: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Run one path per env (``envs[i]`` on ``tasks[i]``, reset with ``seeds[i]``).

    ``noise [len(envs), T, act_dim]`` scales the policy's std; ``task_ids [len(envs)]``
    (default ``0..n-1``) is what a per-task policy receives for each row, and
    ``extra_obs [len(envs), k]`` is appended to every observation of each path.
    Returns numpy arrays ``obs, actions, rewards, lengths, terminated``.
    """
    n, horizon = len(envs), max_path_length
    env_obs_dim = int(np.prod(envs[0].observation_space.shape))
    obs_dim = env_obs_dim + (0 if extra_obs is None else extra_obs.shape[1])
    ids = torch.as_tensor(np.arange(n) if task_ids is None else np.asarray(task_ids)).long()
    act_dim = int(np.prod(envs[0].action_space.shape))
    obs = np.zeros((n, horizon, obs_dim), np.float32)
    actions = np.zeros((n, horizon, act_dim), np.float32)
    rewards = np.zeros((n, horizon), np.float32)
    lengths = np.full(n, horizon, np.int64)
    terminated = np.zeros(n, bool)
    current = np.zeros((n, obs_dim), np.float32)
    if extra_obs is not None:
        current[:, env_obs_dim:] = extra_obs
    for i, env in enumerate(envs):
        env.unwrapped.set_task(tasks[i])  # type: ignore[attr-defined]
        current[i, :env_obs_dim] = env.reset(seed=int(seeds[i]))[0]
    # envs of one class that steps many at once (``step_many(envs, actions)``, e.g.
    # Navigation2DEnv): one call per time step instead of one per env
    unwrapped = [env.unwrapped for env in envs]
    kinds = {type(env) for env in unwrapped}
    step_many = getattr(kinds.pop(), "step_many", None) if len(kinds) == 1 else None
    active = np.arange(n)
    for t in range(horizon):
        if active.size == 0:
            break
        obs[active, t] = current[active]
        with torch.no_grad():
            rows = torch.from_numpy(active)
            # every path's row, finished ones too (their output is dropped): the batch keeps
            # one shape, so a per-task policy reshapes it instead of scattering it
            mean, log_std = _call_policy(policy, torch.from_numpy(current), ids)
            mean = mean[rows]
            if log_std.dim() > 1:
                log_std = log_std[rows]
            eps = noise[rows, t].to(mean.dtype)
            act = (mean + torch.exp(log_std) * eps).to(torch.float32).numpy()
        actions[active, t] = act
        if step_many is not None:
            o, r, term, trunc = step_many([unwrapped[i] for i in active], act)
            rewards[active, t] = r
            current[active, :env_obs_dim] = o
            done = term | trunc
            lengths[active[done]] = t + 1
            terminated[active[term]] = True
            active = active[~done]
            continue
        keep = np.ones(active.size, bool)
        for j, i in enumerate(active):
            o, r, term, trunc, _ = envs[i].step(act[j])
            rewards[i, t] = r
            current[i, :env_obs_dim] = o
            if term or trunc:
                keep[j] = False
                lengths[i] = t + 1
                terminated[i] = bool(term)
        active = active[keep]
    return {
        "obs": obs,
        "actions": actions,
        "rewards": rewards,
        "lengths": lengths,
        "terminated": terminated,
    }


def _worker(conn: Connection, env_id: str, env_kwargs: dict[str, Any] | None) -> None:
    torch.set_num_threads(1)
    envs: list[gymnasium.Env] = []
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                break
            policy, tasks, seeds, noise, horizon, task_ids, extra_obs = msg
            while len(envs) < len(tasks):
                envs.append(make_env(env_id, env_kwargs).unwrapped)
            if len(tasks) == 0:
                conn.send(None)
                continue
            conn.send(
                rollout(
                    envs[: len(tasks)], tasks, seeds, policy, noise, horizon, task_ids, extra_obs
                )
            )
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        for env in envs:
            env.close()
        conn.close()


class VectorSampler:
    """Sample ``paths_per_task`` paths for each of ``tasks`` with a batched policy."""

    def __init__(
        self,
        env_id: str,
        max_path_length: int | None = None,
        seed: int | None = None,
        env_kwargs: dict[str, Any] | None = None,
        num_workers: int = 0,
        start_method: str = "spawn",
        num_threads: int | None = 1,
        task_features: TaskFeatures | None = None,
    ) -> None:
        self.env_id = env_id
        self.task_features = task_features
        self.num_threads = num_threads
        self.env_kwargs = dict(env_kwargs or {})
        probe = make_env(env_id, self.env_kwargs)
        if max_path_length is None:
            if probe.spec is None or probe.spec.max_episode_steps is None:
                raise ValueError(f"{env_id} has no max_episode_steps; pass max_path_length")
            max_path_length = probe.spec.max_episode_steps
        self.max_path_length = int(max_path_length)
        self.env_obs_dim = int(np.prod(probe.observation_space.shape))
        extra = 0
        if task_features is not None:
            extra = len(task_features(probe.unwrapped.sample_tasks(1, np.random.default_rng(0))[0]))
        self.obs_dim = self.env_obs_dim + extra
        self.act_dim = int(np.prod(probe.action_space.shape))
        self._envs: list[gymnasium.Env] = [probe.unwrapped]
        self._rng = np.random.default_rng(seed)
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        if num_workers > 0:
            ctx = mp.get_context(start_method)
            for _ in range(num_workers):
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=_worker, args=(child, env_id, self.env_kwargs), daemon=True
                )
                proc.start()
                child.close()
                self._conns.append(parent)
                self._procs.append(proc)

    @property
    def num_workers(self) -> int:
        return len(self._procs)

    def sample_tasks(self, n: int, rng: np.random.Generator | None = None) -> list[Task]:
        """``n`` tasks from the env's task distribution, drawn from ``rng`` (default: the
        sampler's generator)."""
        rng = self._rng if rng is None else rng
        return self._envs[0].unwrapped.sample_tasks(n, rng)  # type: ignore[attr-defined]

    def seed(self, seed: int | np.random.SeedSequence | None) -> None:
        """Restart the sampler's generator (the source of tasks, reset seeds and noise)."""
        self._rng = np.random.default_rng(seed)

    def sample(
        self,
        policy: PolicyFn | Sequence[PolicyFn],
        tasks: Sequence[Task],
        paths_per_task: int,
        deterministic: bool = False,
        shard: tuple[int, int] | None = None,
    ) -> Trajectories:
        """Roll out ``paths_per_task`` paths per task; ``deterministic`` uses the mean action.

        ``policy`` is one policy for all tasks, a per-task policy (``per_task = True``,
        called with the task index of each row) or a list with one policy per task.
        ``shard=(lo, hi)``: roll out only ``tasks[lo:hi]`` (``policy`` is theirs), with the
        reset seeds and noise those paths get when all of ``tasks`` are sampled, so that
        processes sampling their shards together reproduce one process's paths.
        """
        full = len(tasks) * paths_per_task
        horizon = self.max_path_length
        seeds = self._rng.integers(0, 2**31 - 1, size=full)
        gen = torch.Generator().manual_seed(int(self._rng.integers(0, 2**63 - 1)))
        noise = torch.randn(full, horizon, self.act_dim, generator=gen)
        if shard is not None:
            lo, hi = shard
            if not 0 <= lo < hi <= len(tasks):
                raise ValueError(f"shard {shard} is not a non-empty range of {len(tasks)} tasks")
            rows = slice(lo * paths_per_task, hi * paths_per_task)
            tasks, seeds, noise = list(tasks[lo:hi]), seeds[rows], noise[rows]
        if isinstance(policy, list | tuple):
            if len(policy) != len(tasks):
                raise ValueError(f"{len(policy)} policies for {len(tasks)} tasks")
            policy = PolicyList(policy)
        n = len(tasks) * paths_per_task
        path_tasks = [tasks[i // paths_per_task] for i in range(n)]
        task_ids = np.arange(n) // paths_per_task
        extra = None
        if self.task_features is not None:
            feats = [list(self.task_features(task)) for task in tasks]
            extra = np.asarray(feats, np.float32).reshape(len(tasks), -1)[task_ids]
        if deterministic:
            noise.zero_()
        if self._conns:
            out = self._sample_workers(policy, path_tasks, seeds, noise, task_ids, extra)
        else:
            while len(self._envs) < n:
                self._envs.append(make_env(self.env_id, self.env_kwargs).unwrapped)
            with torch_threads(self.num_threads):
                out = rollout(
                    self._envs[:n], path_tasks, seeds, policy, noise, horizon, task_ids, extra
                )
        lengths = torch.from_numpy(out["lengths"])
        mask = (torch.arange(horizon).unsqueeze(0) < lengths.unsqueeze(1)).to(torch.float32)
        return Trajectories(
            obs=torch.from_numpy(out["obs"]),
            actions=torch.from_numpy(out["actions"]),
            rewards=torch.from_numpy(out["rewards"]),
            mask=mask,
            task_index=torch.arange(n) // paths_per_task,
            lengths=lengths,
            terminated=torch.from_numpy(out["terminated"]),
            tasks=list(tasks),
        )

    def _sample_workers(
        self,
        policy: Any,
        path_tasks: list[Task],
        seeds: np.ndarray,
        noise: Tensor,
        task_ids: np.ndarray,
        extra: np.ndarray | None,
    ) -> dict[str, np.ndarray]:
        detached = getattr(policy, "detached", None)
        if callable(detached):
            policy = detached()
        bounds = np.linspace(0, len(path_tasks), self.num_workers + 1).astype(int)
        for w, conn in enumerate(self._conns):
            lo, hi = bounds[w], bounds[w + 1]
            part = None if extra is None else extra[lo:hi]
            msg = (policy, path_tasks[lo:hi], seeds[lo:hi], noise[lo:hi], self.max_path_length)
            conn.send((*msg, task_ids[lo:hi], part))
        parts = [conn.recv() for conn in self._conns]
        parts = [p for p in parts if p is not None]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def close(self) -> None:
        """Stop the worker processes (if any) and close the envs."""
        for conn in self._conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []
        for env in self._envs:
            env.close()
        self._envs = []

    def __enter__(self) -> VectorSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_procs", None):
            try:
                self.close()
            except Exception:  # interpreter shutdown: nothing sensible left to do
                pass
