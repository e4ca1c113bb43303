"""Meta-RL environments: registration, task sampling, rewards against their formulas."""

from __future__ import annotations

import numpy as np
import pytest

gymnasium = pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

import metagrad.rl  # noqa: E402,F401  (registers the IDs)
from metagrad.rl.envs import (  # noqa: E402
    AntDirEnv,
    AntVelEnv,
    HalfCheetahDirEnv,
    HalfCheetahVelEnv,
    Navigation2DEnv,
)

IDS = {
    "metagrad/Navigation2D-v0": (Navigation2DEnv, 100),
    "metagrad/HalfCheetahVel-v0": (HalfCheetahVelEnv, 200),
    "metagrad/HalfCheetahDir-v0": (HalfCheetahDirEnv, 200),
    "metagrad/AntVel-v0": (AntVelEnv, 200),
    "metagrad/AntDir-v0": (AntDirEnv, 200),
}


@pytest.mark.parametrize("env_id", sorted(IDS))
def test_make_finds_registered_ids(env_id: str) -> None:
    cls, horizon = IDS[env_id]
    env = gymnasium.make(env_id)
    assert isinstance(env.unwrapped, cls)
    assert env.spec.max_episode_steps == horizon
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert callable(env.unwrapped.sample_tasks) and callable(env.unwrapped.set_task)
    env.close()


@pytest.mark.parametrize("env_id", sorted(IDS))
def test_sample_tasks_ranges_and_determinism(env_id: str) -> None:
    env = gymnasium.make(env_id).unwrapped
    tasks = env.sample_tasks(1000, np.random.default_rng(3))
    assert tasks == env.sample_tasks(1000, np.random.default_rng(3))
    assert tasks != env.sample_tasks(1000, np.random.default_rng(4))
    (key,) = tasks[0].keys()
    if key == "goal":
        goals = np.array([t["goal"] for t in tasks])
        assert goals.shape == (1000, 2)
        assert goals.min() >= -0.5 and goals.max() <= 0.5
        assert goals.min() < -0.45 and goals.max() > 0.45
    elif key == "velocity":
        v = np.array([t["velocity"] for t in tasks])
        hi = 2.0 if "Cheetah" in env_id else 3.0
        assert v.min() >= 0.0 and v.max() <= hi and v.max() > 0.95 * hi and v.min() < 0.05 * hi
    else:
        d = np.array([t["direction"] for t in tasks])
        assert set(d.tolist()) == {-1.0, 1.0}
        assert 400 < (d > 0).sum() < 600


def test_navigation_reward_clipping_and_termination() -> None:
    env = gymnasium.make("metagrad/Navigation2D-v0")
    env.unwrapped.set_task({"goal": [0.3, -0.2]})
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.float32 and np.array_equal(obs, [0.0, 0.0])
    pos = np.zeros(2)
    for a in ([5.0, -5.0], [0.5, 0.2], [-10.0, 0.7], [1.0, -1.0]):
        obs, r, term, trunc, info = env.step(np.array(a, np.float32))
        pos = pos + 0.1 * np.clip(np.array(a, np.float32).astype(np.float64), -1, 1)
        np.testing.assert_allclose(info["position"], pos, atol=1e-12)
        np.testing.assert_allclose(obs, pos.astype(np.float32))
        assert r == pytest.approx(-np.linalg.norm(pos - [0.3, -0.2]), abs=1e-12)
        assert not term and not trunc
    # Within 0.01 of the goal in each coordinate terminates; 0.011 does not.
    for off, done in ((0.0099, True), (0.011, False)):
        obs, _ = env.reset(options={"task": {"goal": [0.05, -0.03]}})
        _, r, term, _, _ = env.step(np.array([0.05 + off, -0.03 + off]) / 0.1)
        assert term is done
        assert r == pytest.approx(-np.sqrt(2) * off, rel=1e-6)
    # Horizon 100 through the TimeLimit.
    env.reset(options={"task": {"goal": [0.5, 0.5]}})
    steps, trunc = 0, False
    while not trunc:
        _, _, term, trunc, _ = env.step(np.zeros(2))
        steps += 1
        assert not term
    assert steps == 100


def test_navigation_step_many_is_step_one_by_one() -> None:
    from metagrad.rl.envs import Navigation2DEnv

    goals = [[0.3, -0.2], [0.05, -0.03], [-0.5, 0.5], [0.0, 0.1]]
    one = [Navigation2DEnv({"goal": g}) for g in goals]
    many = [Navigation2DEnv({"goal": g}) for g in goals]
    for env in one + many:
        env.reset(seed=0)
    rng = np.random.default_rng(0)
    for t in range(6):
        acts = rng.uniform(-3, 3, (4, 2)).astype(np.float32)  # some beyond [-1, 1]
        if t == 0:
            acts[1] = np.array([0.05 + 0.005, -0.03 + 0.005], np.float32) / 0.1  # terminates
        obs, rew, term, trunc = Navigation2DEnv.step_many(many, acts)
        for i, env in enumerate(one):
            o, r, te, tr, _ = env.step(acts[i])
            assert np.array_equal(obs[i], o) and rew[i] == r  # the same floats
            assert bool(term[i]) is te and bool(trunc[i]) is tr
        assert term[1] == (t == 0)
    for a, b in zip(one, many, strict=True):  # the envs' state moved the same way
        assert np.array_equal(a.reset(seed=1)[0], b.reset(seed=1)[0])
        assert np.array_equal(a.step(np.ones(2, np.float32))[0], b.step(np.ones(2, np.float32))[0])


def _actions(rng: np.random.Generator, n: int, dim: int) -> list[np.ndarray]:
    acts = [rng.uniform(-1, 1, dim) for _ in range(n)]
    acts[1] = rng.uniform(-3, 3, dim)  # out of bounds: the control cost is on clip(a)
    return acts


@pytest.mark.parametrize("kind", ["vel", "dir"])
def test_half_cheetah_rewards(kind: str) -> None:
    env_id, task = {
        "vel": ("metagrad/HalfCheetahVel-v0", {"velocity": 1.3}),
        "dir": ("metagrad/HalfCheetahDir-v0", {"direction": -1.0}),
    }[kind]
    env = gymnasium.make(env_id)
    u = env.unwrapped
    env.reset(seed=1, options={"task": task})
    assert u.dt == pytest.approx(0.05)
    for a in _actions(np.random.default_rng(0), 15, 6):
        x0 = float(u.data.qpos[0])
        _, r, term, _, info = env.step(a)
        vx = (float(u.data.qpos[0]) - x0) / u.dt
        ctrl = 0.05 * np.sum(np.clip(a, -1, 1) ** 2)
        fwd = -abs(vx - 1.3) if kind == "vel" else -1.0 * vx
        assert r == pytest.approx(fwd - ctrl, abs=1e-10)
        assert info["x_velocity"] == pytest.approx(vx, abs=1e-10)
        assert info["reward_forward"] + info["reward_ctrl"] == pytest.approx(r, abs=1e-12)
        assert not term


@pytest.mark.parametrize("kind", ["vel", "dir"])
def test_ant_rewards_and_termination(kind: str) -> None:
    env_id, task = {
        "vel": ("metagrad/AntVel-v0", {"velocity": 0.7}),
        "dir": ("metagrad/AntDir-v0", {"direction": 1.0}),
    }[kind]
    env = gymnasium.make(env_id)
    u = env.unwrapped
    env.reset(seed=2, options={"task": task})
    contact_seen = 0.0
    for a in _actions(np.random.default_rng(1), 25, 8):
        x0 = float(u.data.qpos[0])
        _, r, term, _, info = env.step(a)
        vx = (float(u.data.qpos[0]) - x0) / u.dt
        ctrl = 0.005 * np.sum(np.clip(a, -1, 1) ** 2)
        contact = 0.5e-3 * np.sum(np.clip(u.data.cfrc_ext, -1, 1) ** 2)
        fwd = -abs(vx - 0.7) + 1.0 if kind == "vel" else vx
        assert r == pytest.approx(fwd - ctrl - contact + 0.05, abs=1e-10)
        parts = [info[k] for k in ("reward_forward", "reward_ctrl", "reward_contact")]
        assert sum(parts) + info["reward_survive"] == pytest.approx(r, abs=1e-12)
        contact_seen = max(contact_seen, contact)
        z = float(u.data.qpos[2])
        assert term is not (0.2 <= z <= 1.0)
        if term:  # random actions can make the ant jump out of the healthy range
            break
    assert contact_seen > 0.0  # the contact term was exercised
    # Unhealthy (torso above 1.0) terminates; bonuses are still paid on that step.
    env.reset(seed=3)
    qpos, qvel = u.data.qpos.copy(), u.data.qvel.copy()
    qpos[2] = 1.5
    u.set_state(qpos, qvel)
    _, r, term, _, info = env.step(np.zeros(8))
    assert term
    assert info["reward_survive"] == pytest.approx(1.05 if kind == "vel" else 0.05)


def test_task_persists_and_kwargs_pass_through() -> None:
    env = gymnasium.make("metagrad/HalfCheetahVel-v0", frame_skip=1)
    assert env.unwrapped.dt == pytest.approx(0.01)
    env.unwrapped.set_task({"velocity": 0.25})
    env.reset(seed=0)
    env.reset()
    assert env.unwrapped.task == {"velocity": 0.25}
    ant = gymnasium.make("metagrad/AntDir-v0", include_cfrc_ext_in_observation=False)
    obs, _ = ant.reset(seed=0)
    assert obs.shape == (27,)
    assert ant.unwrapped.task["direction"] in (-1.0, 1.0)  # drawn at first reset
    with pytest.raises(ValueError):
        ant.unwrapped.set_task({"direction": 0.5})


@pytest.mark.parametrize("env_id", sorted(IDS))
def test_task_drawn_at_seeded_reset_is_reproducible(env_id: str) -> None:
    tasks = []
    for _ in range(2):
        env = gymnasium.make(env_id)
        env.reset(seed=7)
        tasks.append(env.unwrapped.task)
    assert tasks[0] is not None and tasks[0] == tasks[1]
