"""Meta-RL task distributions of MAML section 5.3 as gymnasium environments.

Importing :mod:`metagrad.rl` registers

===============================  =====================================  ========
ID                               task                                   horizon
===============================  =====================================  ========
``metagrad/Navigation2D-v0``     ``{"goal": [x, y]}``, U[-0.5, 0.5]^2    100
``metagrad/HalfCheetahVel-v0``   ``{"velocity": v}``, v ~ U[0, 2]       200
``metagrad/HalfCheetahDir-v0``   ``{"direction": +-1.0}``, p = 1/2       200
``metagrad/AntVel-v0``           ``{"velocity": v}``, v ~ U[0, 3]       200
``metagrad/AntDir-v0``           ``{"direction": +-1.0}``, p = 1/2       200
===============================  =====================================  ========

Every ``env.unwrapped`` has ``sample_tasks(n, rng)`` and ``set_task(task)``; a task can
also be passed as ``env.reset(options={"task": task})``. A task stays set across resets
(as ``reset_args`` did in the original); an env reset with no task ever set draws one
from its own ``np_random``. ``info`` carries the reward components (``reward_*`` keys,
which add up to the reward) and the measured ``x_velocity``.

Rewards follow cbfinn/maml_rl (``point_env_randgoal.py``, ``half_cheetah_env_rand.py``,
``half_cheetah_env_rand_direc.py``, ``ant_env_rand.py``, ``ant_env_rand_direc.py``):

* Navigation2D: ``pos += 0.1 * clip(a, -1, 1)``; ``r = -||pos - goal||``; terminated when
  ``|dx| < 0.01 and |dy| < 0.01``. The point env's own bounds are ``+-0.1``; the original
  wrapped it in rllab's ``normalize()``, which maps the policy's ``[-1, 1]`` onto them,
  so the policy acts in ``[-1, 1]`` units here too (a unit-std initial policy explores
  steps of ~0.1, not saturated ones).
* HalfCheetahVel: ``r = -|v_x - v_goal| - 0.05 ||clip(a)||^2``.
* HalfCheetahDir: ``r = dir * v_x - 0.05 ||clip(a)||^2``.
* AntVel: ``r = -|v_x - v_goal| + 1.0 - 0.005 ||clip(a)||^2 - contact + 0.05``.
* AntDir: ``r = dir * v_x - 0.005 ||clip(a)||^2 - contact + 0.05`` (no +1.0 bonus).
  ``contact = 0.5e-3 * sum(clip(cfrc_ext, -1, 1)^2)`` over all bodies (world row included,
  it is zero). Both Ant tasks terminate when unhealthy: non-finite state or torso height
  outside ``[0.2, 1.0]``. The +1.0 and +0.05 are paid on every step, the terminal one too.

Findings from reading the original code (the formulas above already follow it):

* Actions: the original ran every env inside rllab's ``normalize()``, which maps the
  action from ``[-1, 1]`` onto the env's bounds and clips it before the env sees it, so
  every control cost is on the clipped action; here the env clips (the sampler stores the
  unclipped Gaussian sample). The locomotion bounds are ``[-1, 1]`` (the map is the
  identity); the point env's are ``+-0.1`` (the map scales by 0.1).
  The Ant cost in the original is ``0.5e-2 * sum((a / scaling)^2)`` with rllab's ant.xml
  ``ctrlrange = +-150`` (gear 1), i.e. ``0.005 ||a||^2`` in normalised units, which is what
  gymnasium's ant.xml (``ctrlrange = +-1``, gear 150) takes directly.
* Direction tasks were sampled as ``v ~ U[0, 2]`` (cheetah) / ``U[0, 3]`` (ant) and
  thresholded at the midpoint; that is a fair coin, so we draw ``+-1.0`` directly.
* The original Ant ``contact_cost`` line ends in a stray comma (a 1-tuple); numpy
  broadcasting makes the reward the intended scalar, so there is nothing to follow there.

Where the dynamics differ from the original rllab models (MuJoCo 1.31, rllab XMLs):

* Time step. rllab's ``half_cheetah.xml`` has ``timestep=0.01`` and no ``frame_skip``
  (so 1): one env step was 0.01 s and 200 steps 2 s of simulated time. rllab's ant.xml:
  ``timestep=0.02``, RK4 integrator, frame skip 1 (0.02 s per step). gymnasium v5 uses
  ``timestep=0.01`` and ``frame_skip=5`` for both (Euler; dt = 0.05 s, 200 steps = 10 s).
  We keep gymnasium's defaults; pass ``frame_skip=1`` to ``gymnasium.make`` to get the
  cheetah's original control rate (the ant's RK4 0.02 s step has no exact equivalent).
* Velocity. The original used ``get_body_comvel("torso")[0]``: the instantaneous
  velocity of the torso's centre of mass after the step. We use the finite difference
  ``(x_after - x_before) / dt`` of the torso position (``qpos[0]``, the root joint's x,
  which for both models is the torso frame's x; ``data.xpos`` would be one substep stale
  after ``mj_step``), i.e. the mean velocity over the step.
* Observations. Cheetah: rllab gave ``qpos[1:], qvel, torso com_subtree`` (20 dims, with
  the absolute x position); gymnasium v5 gives ``qpos[1:], qvel`` (17). Ant: rllab gave
  ``qpos, qvel, clip(cfrc_ext), torso xmat, torso com`` (125 dims); gymnasium v5 gives
  ``qpos[2:], qvel, clip(cfrc_ext[1:])`` (105) with the default
  ``include_cfrc_ext_in_observation=True`` (27 without). The contact cost reads
  ``data.cfrc_ext`` whatever that option is: gymnasium v5 calls ``mj_rnePostConstraint``
  after stepping, which MuJoCo >= 2 needs to fill ``cfrc_ext`` (it is computed from the
  last substep's state, where rllab called ``forward()`` on the final state first).
* Initial state. rllab's ant starts at z = 0.55 with legs bent (``init_qpos``) and resets
  with ``qpos + N(0, 0.01^2)``, ``qvel + N(0, 0.1^2)``; gymnasium v5 starts the ant at
  z = 0.75 with straight joints and both envs reset with ``qpos + U(-0.1, 0.1)``,
  ``qvel + 0.1 N(0, 1)``. rllab's Ant XML also differs in contact parameters (margin 0.01).

The compiled MuJoCo model is cached per XML file and copied for each env (gymnasium's
``half_cheetah.xml`` uses ``settotalmass``, for which MuJoCo 4 prints a deprecation warning
on every compile; with the cache it prints once per process).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import gymnasium
import mujoco
import numpy as np
from gymnasium import spaces
from gymnasium.envs.mujoco.ant_v5 import AntEnv
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv
from gymnasium.utils import EzPickle

Task = dict[str, Any]

CHEETAH_CTRL_COST = 0.5 * 1e-1
ANT_CTRL_COST = 0.5 * 1e-2
ANT_CONTACT_COST = 0.5 * 1e-3
ANT_SURVIVE_REWARD = 0.05
ANT_VEL_BONUS = 1.0

_MODEL_CACHE: dict[str, mujoco.MjModel] = {}


class Navigation2DEnv(gymnasium.Env):
    """2D point navigation to a goal (MAML's ``PointEnvRandGoal``).

    The point starts at the origin; the action, in rllab's normalised units, is clipped to
    ``[-1, 1]`` per coordinate and scaled by ``max_step`` (0.1) into the move; the reward is
    minus the distance to the goal after the move.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(
        self, task: Task | None = None, tolerance: float = 0.01, max_step: float = 0.1
    ) -> None:
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.tolerance = tolerance
        self.max_step = max_step
        self._goal: np.ndarray | None = None
        self._pos = np.zeros(2)
        if task is not None:
            self.set_task(task)

    @staticmethod
    def sample_tasks(n: int, rng: np.random.Generator) -> list[Task]:
        """``n`` goals uniform in ``[-0.5, 0.5]^2``."""
        return [{"goal": g.tolist()} for g in rng.uniform(-0.5, 0.5, size=(n, 2))]

    def set_task(self, task: Task) -> None:
        self._goal = np.asarray(task["goal"], dtype=np.float64).reshape(2)

    @property
    def task(self) -> Task | None:
        return None if self._goal is None else {"goal": self._goal.tolist()}

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        if options is not None and "task" in options:
            self.set_task(options["task"])
        if self._goal is None:
            self.set_task(self.sample_tasks(1, self.np_random)[0])
        self._pos = np.zeros(2)
        return self._pos.astype(np.float32), {"position": self._pos.copy()}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        assert self._goal is not None, "call reset() first"
        # Plain float arithmetic: numpy call overhead dominates for a 2-vector.
        ax, ay = np.asarray(action, dtype=np.float64).reshape(2).tolist()
        x = float(self._pos[0]) + self.max_step * min(max(ax, -1.0), 1.0)
        y = float(self._pos[1]) + self.max_step * min(max(ay, -1.0), 1.0)
        self._pos = np.array((x, y))
        dx, dy = x - float(self._goal[0]), y - float(self._goal[1])
        distance = math.sqrt(dx * dx + dy * dy)
        terminated = abs(dx) < self.tolerance and abs(dy) < self.tolerance
        info = {"position": self._pos.copy(), "distance": distance, "reward_goal": -distance}
        return self._pos.astype(np.float32), -distance, terminated, False, info

    @staticmethod
    def step_many(
        envs: Sequence[Navigation2DEnv], actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`step` of ``envs[i]`` with ``actions[i]`` for every ``i`` in numpy arrays:
        ``(obs, rewards, terminated, truncated)``, the same numbers as the calls one by one
        (the same float64 operations), without their per-call overhead."""
        pos = np.array([env._pos for env in envs], dtype=np.float64).reshape(-1, 2)
        goal = np.array([env._goal for env in envs], dtype=np.float64).reshape(-1, 2)
        steps = np.array([env.max_step for env in envs], dtype=np.float64).reshape(-1, 1)
        tol = np.array([env.tolerance for env in envs], dtype=np.float64)
        a = np.asarray(actions, dtype=np.float64).reshape(-1, 2)
        pos = pos + steps * np.minimum(np.maximum(a, -1.0), 1.0)
        d = pos - goal
        distance = np.sqrt(d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1])
        terminated = (np.abs(d[:, 0]) < tol) & (np.abs(d[:, 1]) < tol)
        for env, p in zip(envs, pos, strict=True):
            env._pos = p
        return pos.astype(np.float32), -distance, terminated, np.zeros(len(envs), bool)


class _MujocoTaskMixin:
    """Task handling and model caching shared by the locomotion envs."""

    fullpath: str
    np_random: np.random.Generator
    action_space: spaces.Box

    def _initialize_simulation(self) -> tuple[mujoco.MjModel, mujoco.MjData]:
        # Overrides gymnasium's MujocoEnv hook: compile each XML once per process.
        model = _MODEL_CACHE.get(self.fullpath)
        if model is None:
            model = _MODEL_CACHE[self.fullpath] = mujoco.MjModel.from_xml_path(self.fullpath)
        model = copy.deepcopy(model)
        width, height = getattr(self, "width", 0), getattr(self, "height", 0)
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, width)
        model.vis.global_.offheight = max(model.vis.global_.offheight, height)
        return model, mujoco.MjData(model)

    def __init__(self, task: Task | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # the gymnasium MuJoCo env after this mixin in the MRO
        EzPickle.__init__(self, task=task, **kwargs)
        if task is not None:
            self.set_task(task)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        obs, info = super().reset(seed=seed, options=options)  # type: ignore[misc]
        self._prepare_reset(options)  # after seeding: a task drawn here is reproducible
        return obs, info

    def _simulate(self, action: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Clip and apply ``action``; (clipped action, x after, x velocity of the torso)."""
        a = self._clip(action)
        x_before = float(self.data.qpos[0])  # type: ignore[attr-defined]
        self.do_simulation(a, self.frame_skip)  # type: ignore[attr-defined]
        x_after = float(self.data.qpos[0])  # type: ignore[attr-defined]
        return a, x_after, (x_after - x_before) / self.dt  # type: ignore[attr-defined]

    def sample_tasks(self, n: int, rng: np.random.Generator) -> list[Task]:
        raise NotImplementedError

    def set_task(self, task: Task) -> None:
        raise NotImplementedError

    @property
    def task(self) -> Task | None:
        raise NotImplementedError

    def _prepare_reset(self, options: dict[str, Any] | None) -> None:
        if options is not None and "task" in options:
            self.set_task(options["task"])
        if self.task is None:
            self.set_task(self.sample_tasks(1, self.np_random)[0])

    def _clip(self, action: np.ndarray) -> np.ndarray:
        a = np.asarray(action, dtype=np.float64)
        return np.clip(a, self.action_space.low, self.action_space.high)


class _VelocityTask:
    """Goal-velocity task: forward term ``-|v_x - v_goal|``."""

    velocity_range: tuple[float, float]
    _goal_velocity: float | None = None

    def sample_tasks(self, n: int, rng: np.random.Generator) -> list[Task]:
        lo, hi = self.velocity_range
        return [{"velocity": float(v)} for v in rng.uniform(lo, hi, size=n)]

    def set_task(self, task: Task) -> None:
        self._goal_velocity = float(task["velocity"])

    @property
    def task(self) -> Task | None:
        return None if self._goal_velocity is None else {"velocity": self._goal_velocity}

    def _forward_term(self, x_velocity: float) -> float:
        assert self._goal_velocity is not None
        return -abs(x_velocity - self._goal_velocity)


class _DirectionTask:
    """Direction task: forward term ``direction * v_x``."""

    _direction: float | None = None

    def sample_tasks(self, n: int, rng: np.random.Generator) -> list[Task]:
        return [{"direction": float(d)} for d in rng.choice([-1.0, 1.0], size=n)]

    def set_task(self, task: Task) -> None:
        direction = float(task["direction"])
        if direction not in (-1.0, 1.0):
            raise ValueError(f"direction must be +1 or -1, got {direction}")
        self._direction = direction

    @property
    def task(self) -> Task | None:
        return None if self._direction is None else {"direction": self._direction}

    def _forward_term(self, x_velocity: float) -> float:
        assert self._direction is not None
        return self._direction * x_velocity


class _HalfCheetahTaskEnv(_MujocoTaskMixin, HalfCheetahEnv):
    """HalfCheetah-v5 dynamics with a task reward ``forward - 0.05 ||clip(a)||^2``."""

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        a, x_after, x_velocity = self._simulate(action)
        forward = self._forward_term(x_velocity)  # type: ignore[attr-defined]
        ctrl = CHEETAH_CTRL_COST * float(np.sum(np.square(a)))
        info = {
            "x_position": x_after,
            "x_velocity": x_velocity,
            "reward_forward": forward,
            "reward_ctrl": -ctrl,
        }
        return self._get_obs(), forward - ctrl, False, False, info


class HalfCheetahVelEnv(_VelocityTask, _HalfCheetahTaskEnv):
    """HalfCheetah running at a goal velocity ``v ~ U[0, 2]``."""

    velocity_range = (0.0, 2.0)


class HalfCheetahDirEnv(_DirectionTask, _HalfCheetahTaskEnv):
    """HalfCheetah running forward (+1) or backward (-1)."""


class _AntTaskEnv(_MujocoTaskMixin, AntEnv):
    """Ant-v5 dynamics with the maml_rl Ant rewards (see the module docstring)."""

    bonus: float = 0.0

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        a, x_after, x_velocity = self._simulate(action)
        forward = self._forward_term(x_velocity)  # type: ignore[attr-defined]
        ctrl = ANT_CTRL_COST * float(np.sum(np.square(a)))
        contact = ANT_CONTACT_COST * float(np.sum(np.square(np.clip(self.data.cfrc_ext, -1, 1))))
        survive = self.bonus + ANT_SURVIVE_REWARD
        reward = forward - ctrl - contact + survive
        terminated = bool(self._terminate_when_unhealthy and not self.is_healthy)
        info = {
            "x_position": x_after,
            "x_velocity": x_velocity,
            "reward_forward": forward,
            "reward_ctrl": -ctrl,
            "reward_contact": -contact,
            "reward_survive": survive,
        }
        return self._get_obs(), reward, terminated, False, info


class AntVelEnv(_VelocityTask, _AntTaskEnv):
    """Ant running at a goal velocity ``v ~ U[0, 3]`` (+1.0 per-step bonus, as the original)."""

    velocity_range = (0.0, 3.0)
    bonus = ANT_VEL_BONUS


class AntDirEnv(_DirectionTask, _AntTaskEnv):
    """Ant running forward (+1) or backward (-1)."""


ENV_SPECS: dict[str, tuple[str, int]] = {
    "metagrad/Navigation2D-v0": ("Navigation2DEnv", 100),
    "metagrad/HalfCheetahVel-v0": ("HalfCheetahVelEnv", 200),
    "metagrad/HalfCheetahDir-v0": ("HalfCheetahDirEnv", 200),
    "metagrad/AntVel-v0": ("AntVelEnv", 200),
    "metagrad/AntDir-v0": ("AntDirEnv", 200),
}


def register_envs() -> None:
    """Register the IDs of :data:`ENV_SPECS` with gymnasium (idempotent)."""
    for env_id, (cls_name, horizon) in ENV_SPECS.items():
        if env_id not in gymnasium.registry:
            gymnasium.register(
                id=env_id, entry_point=f"{__name__}:{cls_name}", max_episode_steps=horizon
            )
