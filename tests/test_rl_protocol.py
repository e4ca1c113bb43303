"""The meta-RL test protocol of the original code: each method's step sizes, the budget of
env steps per step, a fresh random policy per task, validation tasks (never the test tasks)
for checkpoint selection and step-size tuning, and paired per-task differences."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gymnasium")

from metagrad.experiments.config import preset  # noqa: E402
from metagrad.experiments.registry import experiment_for  # noqa: E402
from metagrad.rl.maml_trpo import MAMLTRPO  # noqa: E402


def small(name: str = "rl-nav2d", **kw):
    cfg = preset(name) | {"preset": name, "horizon": 10, "rollouts": 2, "eval_tasks": 4}
    cfg |= {"eval_env_steps": 30, "val_tasks": 3, "tune_tasks": 3, "eval_lr_grid": [0.1, 0.3]}
    return experiment_for(cfg | kw)


@pytest.fixture
def calls(monkeypatch):
    """Records what each adaptation_returns call reaches the sampler with; the curve it
    returns rewards a first step size of 0.3 (so tuning must pick it)."""
    seen = []

    def fake(self, policy, sampler, tasks, rollouts, lrs, initial=None):
        seen.append(
            {"tasks": list(tasks), "rollouts": rollouts, "lrs": list(lrs), "initial": initial}
        )
        first = -abs(lrs[0] - 0.3) if lrs else 0.0
        steps = torch.arange(len(lrs) + 1, dtype=torch.float64)
        return (steps * (1 + first) + torch.arange(len(tasks))[:, None]).float()

    monkeypatch.setattr(MAMLTRPO, "adaptation_returns", fake)
    return seen


def test_budget_and_fixed_step_sizes_reach_the_sampler(calls):
    exp = small(method="pretrain", pretrain_eval_lr=0.2)
    result = exp.evaluate(exp.build())
    (call,) = calls
    assert call["lrs"] == [0.2, 0.1, 0.1] and call["rollouts"] == 3  # 30 env steps / horizon 10
    assert call["tasks"] == exp.eval_tasks() and result["tuning"] == {}
    assert result["env_steps_per_step"] == 30 and result["step_sizes"] == [0.2, 0.1, 0.1]


def test_the_oracle_is_not_adapted(calls):
    exp = small(method="oracle")
    result = exp.evaluate(exp.build())
    (call,) = calls  # no tuning: its step size is 0, as the original's oracle
    assert call["lrs"] == [0.0, 0.0, 0.0] and result["step_sizes"] == [0.0, 0.0, 0.0]


def test_pretrained_step_size_is_tuned_on_validation_tasks(calls):
    exp = small(method="pretrain")
    result = exp.evaluate(exp.build())
    *tuning, final = calls
    validation = exp.tasks_from(exp.cfg["val_seed"], 3)
    assert [c["lrs"] for c in tuning] == [[0.1], [0.3]]
    assert all(c["tasks"] == validation for c in tuning)
    assert not any(t in exp.eval_tasks() for t in validation)
    assert result["tuning"]["trained"]["lr"] == 0.3 and final["lrs"] == [0.3, 0.15, 0.15]


def test_maml_keeps_its_step_and_the_random_baseline_is_a_fresh_policy_per_task(calls):
    exp = small()  # rl-nav2d: alpha 0.5, as the code behind the paper's curve
    result = exp.evaluate(exp.build())
    trained = next(c for c in calls if c["initial"] is None and len(c["lrs"]) == 3)
    assert trained["lrs"] == [0.5, 0.25, 0.25]
    random = [c for c in calls if c["initial"] is not None]
    assert [c["lrs"] for c in random] == [[0.1], [0.3], [0.3, 0.15, 0.15]]
    weights = random[-1]["initial"]["mean_net.0.weight"]
    assert weights.shape[0] == 4 and not torch.equal(weights[0], weights[1])
    assert set(result["results"]) == {"trained", "random"}


def test_ant_direction_budget_and_later_steps():
    exp = small("rl-ant-dir", horizon=200, eval_env_steps=8000)
    assert preset("rl-ant-dir")["eval_env_steps"] == 8000
    assert exp.eval_rollouts == 40 and exp.eval_lrs(0.1) == pytest.approx([0.1, 0.001, 0.001])


@pytest.mark.parametrize("method,lrs", [("maml", [0.5]), ("pretrain", [])])
def test_validation_uses_validation_tasks_only(calls, method, lrs):
    exp = small(method=method)
    out = exp.validate(exp.build())
    (call,) = calls
    assert call["tasks"] == exp.tasks_from(exp.cfg["val_seed"], 3) and call["lrs"] == lrs
    assert not any(t in exp.eval_tasks() for t in call["tasks"])
    assert set(out) == {"val_return"}


def test_paired_differences_are_per_task(calls):
    exp = small(method="pretrain", pretrain_eval_lr=0.3)
    row = exp.evaluate(exp.build())["results"]["trained"]
    ret, paired = row["return"], row["paired"]
    assert paired["vs_0_steps"]["mean"] == pytest.approx([r - ret[0] for r in ret[1:]])
    assert paired["vs_previous"]["mean"] == pytest.approx(
        [b - a for a, b in zip(ret, ret[1:], strict=False)]
    )
    assert paired["vs_0_steps"]["ci95"] == pytest.approx([0.0] * 3, abs=1e-9)  # same gain per task
