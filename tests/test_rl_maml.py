"""MAML with policy gradients (section 5.3): meta-gradient, TRPO step, runs and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.func import functional_call

pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

import metagrad as mg  # noqa: E402
from metagrad.cli import main  # noqa: E402
from metagrad.experiments.config import preset  # noqa: E402
from metagrad.experiments.registry import experiment_for  # noqa: E402
from metagrad.experiments.runs import Run  # noqa: E402
from metagrad.experiments.training import train  # noqa: E402
from metagrad.rl import (  # noqa: E402
    GaussianMLPPolicy,
    PolicyList,
    TaskBatchedPolicy,
    VectorSampler,
    hvp_exact,
)
from metagrad.rl.maml_trpo import (  # noqa: E402
    MAMLTRPO,
    MetaObjective,
    PGBatch,
    PolicyMAML,
    adapt,
    meta_trpo_step,
    reinforce_target,
    task_features,
)
from metagrad.rl.policy import FunctionalPolicy, diag_gaussian_log_prob  # noqa: E402

# end-to-end runs: `pytest -m "not slow"` (make test-fast) leaves them out
pytestmark = pytest.mark.slow

NAV = "metagrad/Navigation2D-v0"


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_batch(tasks: int, rows: int, obs_dim: int, act_dim: int, g: torch.Generator) -> PGBatch:
    mask = (torch.rand(tasks, rows, generator=g) > 0.2).double()
    return PGBatch(
        obs=torch.randn(tasks, rows, obs_dim, generator=g, dtype=torch.float64),
        actions=torch.randn(tasks, rows, act_dim, generator=g, dtype=torch.float64),
        advantages=torch.randn(tasks, rows, generator=g, dtype=torch.float64) * mask,
        mask=mask,
        returns=torch.zeros(tasks, dtype=torch.float64),
    )


def reference_surrogate(policy, pre: PGBatch, post: PGBatch, lr: float, second_order: bool):
    """Hand-written per-task loop: inner step with autograd.grad, then the TRPO surrogate."""
    names = [n for n, _ in policy.named_parameters()]
    theta = [p.detach().clone().requires_grad_(True) for p in policy.parameters()]
    total = 0.0
    for i in range(pre.num_tasks):
        mean, log_std = functional_call(policy, dict(zip(names, theta, strict=True)), (pre.obs[i],))
        logp = diag_gaussian_log_prob(pre.actions[i], mean, log_std)
        inner = -(logp * pre.advantages[i] * pre.mask[i]).sum() / pre.mask[i].sum()
        grads = torch.autograd.grad(inner, theta, create_graph=second_order)
        if not second_order:
            grads = [g.detach() for g in grads]
        fast = dict(
            zip(names, [t - lr * g for t, g in zip(theta, grads, strict=True)], strict=True)
        )
        mean, log_std = functional_call(policy, fast, (post.obs[i],))
        logp_new = diag_gaussian_log_prob(post.actions[i], mean, log_std)
        logp_old = logp_new.detach()  # the old policy is the adaptation of the same theta
        ratio = torch.exp(logp_new - logp_old)
        total = total - (ratio * post.advantages[i] * post.mask[i]).sum() / post.mask[i].sum()
    loss = total / pre.num_tasks
    return torch.autograd.grad(loss, theta)


def test_second_order_meta_gradient_matches_reference_loop():
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(3, 2, hidden_sizes=(6, 5)).double()
    g = torch.Generator().manual_seed(1)
    pre, post = random_batch(3, 9, 3, 2, g), random_batch(3, 7, 3, 2, g)
    grads = {}
    for first_order in (False, True):
        obj = MetaObjective(policy, [pre], [0.3], post, first_order=first_order)
        leaves = [p.detach().requires_grad_(True) for p in policy.parameters()]
        ours = torch.autograd.grad(obj.surrogate(leaves), leaves)
        ref = reference_surrogate(policy, pre, post, 0.3, second_order=not first_order)
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        grads[first_order] = torch.cat([t.flatten() for t in ours])
    # first- and second-order meta-gradients differ
    assert (grads[True] - grads[False]).norm() > 1e-3 * grads[False].norm()


@pytest.mark.parametrize("inner_steps", [1, 2])
@pytest.mark.parametrize("first_order", [False, True])
def test_fisher_product_is_the_kl_hessian_at_the_old_policy(first_order, inner_steps):
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(3, 2, hidden_sizes=(6, 5)).double()
    g = torch.Generator().manual_seed(1)
    inner = [random_batch(3, 9, 3, 2, g) for _ in range(inner_steps)]
    post = random_batch(3, 7, 3, 2, g)
    lrs = [0.3, 0.2][:inner_steps]
    obj = MetaObjective(policy, inner, lrs, post, first_order=first_order)
    theta = [p.detach() for p in policy.parameters()]
    exact, fisher = hvp_exact(obj.kl, theta, 1e-3), obj.fisher_product(theta, 1e-3)
    for _ in range(3):
        v = torch.randn(sum(t.numel() for t in theta), generator=g, dtype=torch.float64)
        torch.testing.assert_close(fisher(v), exact(v), rtol=1e-9, atol=1e-12)
    # one process's share of the tasks (their sum over the total): the shares add up
    shares = []
    for rows in (slice(0, 1), slice(1, 3)):
        part = [
            PGBatch(*(getattr(b, f)[rows] for f in PGBatch.__dataclass_fields__))
            for b in (*inner, post)
        ]
        shares.append(
            MetaObjective(policy, part[:-1], lrs, part[-1], first_order=first_order, total_tasks=3)
        )
    v = torch.randn(sum(t.numel() for t in theta), generator=g, dtype=torch.float64)
    summed = sum(s.fisher_product(theta)(v) for s in shares)
    torch.testing.assert_close(summed, obj.fisher_product(theta)(v), rtol=1e-9, atol=1e-12)


def test_task_rows_sum_to_the_objective_and_its_derivatives():
    # the per-task rows several processes gather (summed in task order): their sums are
    # the surrogate, its gradient, the Fisher product and the line-search scores
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(3, 2, hidden_sizes=(6, 5)).double()
    g = torch.Generator().manual_seed(1)
    pre, post = random_batch(3, 9, 3, 2, g), random_batch(3, 7, 3, 2, g)
    obj = MetaObjective(policy, [pre], [0.3], post, total_tasks=3)
    theta = [p.detach().requires_grad_(True) for p in policy.parameters()]
    terms, rows = obj.task_gradient(theta)
    assert terms.shape == (3,) and rows.shape == (3, sum(t.numel() for t in theta))
    torch.testing.assert_close(terms.sum(), obj.surrogate(theta).detach(), rtol=1e-12, atol=0)
    grad = torch.cat([t.flatten() for t in torch.autograd.grad(obj.surrogate(theta), theta)])
    torch.testing.assert_close(rows.sum(0), grad, rtol=1e-10, atol=1e-12)
    v = torch.randn(rows.shape[1], generator=g, dtype=torch.float64)
    fisher_rows = obj.fisher_product(theta, rows=True)(v)
    assert fisher_rows.shape == rows.shape
    torch.testing.assert_close(fisher_rows.sum(0), obj.fisher_product(theta)(v), rtol=1e-10, atol=1e-12)  # fmt: skip
    with pytest.raises(ValueError, match="damping"):
        obj.fisher_product(theta, 1e-3, rows=True)
    surr, kl = obj.task_scores([t + 0.01 for t in theta])
    loss_ref, kl_ref = obj.evaluate([t + 0.01 for t in theta])
    assert float(surr.sum()) == pytest.approx(loss_ref, rel=1e-12)
    assert float(kl.sum()) == pytest.approx(kl_ref, rel=1e-12) and kl_ref > 0
    # the row path of the TRPO step takes the plain path's step
    plain = meta_trpo_step(obj)
    summed = meta_trpo_step(obj, reduce=lambda r: r.sum(0))
    assert plain.accepted and summed.accepted
    for a, b in zip(plain.params, summed.params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_batched_adaptation_matches_maml_core_adapt():
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(3, 2, hidden_sizes=(6,)).double()
    batch = random_batch(2, 8, 3, 2, torch.Generator().manual_seed(2))
    theta = dict(policy.named_parameters())
    fast = adapt(policy, theta, {}, [batch], [0.2])
    maml = PolicyMAML(policy, inner_lr=0.2)
    for i in range(2):
        target = reinforce_target(batch.actions[i], batch.advantages[i], batch.mask[i])
        one = maml.adapt(batch.obs[i], target, steps=1)
        for k, v in one.params.items():
            torch.testing.assert_close(fast[k][i], v)


def _nav_objective(first_order: bool = False) -> tuple[torch.nn.Module, MetaObjective]:
    torch.manual_seed(3)
    policy = GaussianMLPPolicy(2, 2, hidden_sizes=(16, 16))
    sampler = VectorSampler(NAV, max_path_length=20, seed=4)
    tasks = sampler.sample_tasks(4)
    algo = MAMLTRPO()
    theta = {k: v.detach() for k, v in policy.named_parameters()}
    pre = algo.process(sampler.sample(policy, tasks, 5))
    with torch.no_grad():
        fast = adapt(policy, theta, {}, [pre], [0.1])
    post = algo.process(sampler.sample(TaskBatchedPolicy(policy, fast), tasks, 5))
    return policy, MetaObjective(policy, [pre], [0.1], post, first_order=first_order)


@pytest.mark.parametrize("hvp", ["exact", "finite_difference", "fisher"])
def test_trpo_step_respects_max_kl(hvp):
    policy, obj = _nav_objective()
    max_kl = 0.005
    res = meta_trpo_step(obj, max_kl=max_kl, hvp=hvp)
    if res.accepted:
        kl = float(obj.kl(res.params))
        assert kl <= max_kl * 1.01
        assert abs(kl - res.kl_after) < 1e-6
        assert float(obj.surrogate(res.params)) < res.loss_before
    else:
        old = list(policy.parameters())
        assert all(torch.equal(a, b.detach()) for a, b in zip(res.params, old, strict=True))


def test_first_and_second_order_steps_differ():
    _, so = _nav_objective(first_order=False)
    _, fo = _nav_objective(first_order=True)
    a, b = meta_trpo_step(so), meta_trpo_step(fo)
    diff = sum(float((x - y).abs().sum()) for x, y in zip(a.params, b.params, strict=True))
    assert diff > 1e-4


def test_per_task_policies_and_oracle_observations():
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(2, 2, hidden_sizes=(8,))
    theta = {k: v.detach() for k, v in policy.named_parameters()}
    stacked = {k: torch.stack([v, v + 0.3, v - 0.2]) for k, v in theta.items()}
    tasks = VectorSampler(NAV, seed=0).sample_tasks(3)
    batched = VectorSampler(NAV, max_path_length=15, seed=7).sample(
        TaskBatchedPolicy(policy, stacked), tasks, 2
    )
    singles = [FunctionalPolicy(policy, {k: v[i] for k, v in stacked.items()}) for i in range(3)]
    looped = VectorSampler(NAV, max_path_length=15, seed=7).sample(singles, tasks, 2)
    assert isinstance(PolicyList(singles), PolicyList)
    torch.testing.assert_close(batched.actions, looped.actions)
    torch.testing.assert_close(batched.obs, looped.obs)
    # all rows of every task in order (reshaped, no scatter) = the same rows in any order
    obs = torch.randn(6, 2, generator=torch.Generator().manual_seed(3))
    ids = torch.arange(6) // 2
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    bp = TaskBatchedPolicy(policy, stacked)
    mean, log_std = bp(obs, ids)
    pmean, plog_std = bp(obs[perm], ids[perm])
    assert torch.equal(mean[perm], pmean) and torch.equal(log_std[perm], plog_std)
    with VectorSampler(NAV, max_path_length=15, seed=7, num_workers=2, start_method="fork") as w:
        workers = w.sample(TaskBatchedPolicy(policy, stacked), tasks, 2)
    torch.testing.assert_close(batched.actions, workers.actions)
    oracle = VectorSampler(NAV, max_path_length=5, seed=0, task_features=task_features)
    assert oracle.obs_dim == 4
    tr = oracle.sample(GaussianMLPPolicy(4, 2), tasks, 2)
    goals = torch.tensor([t["goal"] for t in tasks], dtype=torch.float32).repeat_interleave(2, 0)
    assert torch.equal(tr.obs[:, :, 2:], goals[:, None].expand(-1, 5, -1))


def nav_cfg(**kw):
    cfg = preset("rl-nav2d") | {"preset": "rl-nav2d"}
    cfg |= {"meta_batch": 8, "rollouts": 10, "horizon": 50, "eval_tasks": 8, "eval_env_steps": 250}
    cfg |= {"val_tasks": 4, "tune_tasks": 4, "eval_lr_grid": [0.1, 0.5]}
    return cfg | kw


def test_short_seeded_navigation_run_adapts(tmp_path):
    run = Run(tmp_path)
    # 20 test paths per step: with nav_cfg's 5, one step's gain on 8 tasks is within noise
    exp = experiment_for(nav_cfg(iterations=5, seed=1, eval_env_steps=1000))
    maml = train(exp, run, progress=False)
    rows = run.metrics()
    assert len(rows) == 5 and all(r["accepted"] == 1.0 for r in rows)
    pre = np.mean([r["return_pre"] for r in rows])
    post = np.mean([r["return_post"] for r in rows])
    assert post > pre + 2.0, (pre, post)  # one policy-gradient step helps, in training...
    assert rows[-1]["return_pre"] > rows[0]["return_pre"]  # ...and meta-training helps
    assert all(0 < r["kl"] <= 0.01 * 1.01 for r in rows)
    result = exp.evaluate(maml)  # ...and on the test tasks
    trained, rand = (
        result["results"]["trained"]["return"],
        result["results"]["random"]["return"],
    )
    assert trained[1] > trained[0] and trained[0] > rand[0]


def test_resume_is_exact(tmp_path):
    small = {"meta_batch": 3, "rollouts": 4, "horizon": 20, "cg_iters": 3, "checkpoint_every": 2}
    a, b = Run(tmp_path / "a"), Run(tmp_path / "b")
    for r in (a, b):
        r.path.mkdir()
    train(experiment_for(nav_cfg(iterations=4, **small)), a, progress=False)
    train(experiment_for(nav_cfg(iterations=2, **small)), b, progress=False)
    train(experiment_for(nav_cfg(iterations=4, **small)), b, progress=False)
    sa, sb = a.load()["model"], b.load()["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


SMOKE = ["--set", "eval_tasks=3", "--set", "eval_env_steps=16", "--set", "val_tasks=2"]
SMOKE += ["--set", "tune_tasks=2", "--set", "eval_lr_grid=[0.1,0.5]", "--quiet"]


def test_cli_nav_train_eval_plot(tmp_path, capsys):
    out = tmp_path / "maml"
    small = ["--set", "meta_batch=4", "--set", "rollouts=4", "--set", "horizon=30"]
    assert (
        main(["train", "rl-nav2d", "--set", "iterations=2", *small, *SMOKE, "--out", str(out)]) == 0
    )
    assert "random" in capsys.readouterr().out
    assert main(["eval", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "maml" and result["steps"] == [0, 1, 2, 3]
    assert set(result["results"]) == {"trained", "random"}
    assert len(result["results"]["trained"]["return"]) == 4
    pre = tmp_path / "pre"
    args = ["--set", "method=pretrain", "--set", "iterations=1", "--no-eval", "--quiet"]
    assert main(["train", "rl-nav2d", *args, *small, *SMOKE[:-1], "--out", str(pre)]) == 0
    assert main(["eval", str(out), str(pre)]) == 0
    table = capsys.readouterr().out
    assert "maml" in table and "pretrain" in table
    assert main(["plot", str(out), "--baseline", str(pre)]) == 0
    plots = {p.name for p in (out / "plots").iterdir()}
    assert {"return_vs_steps.png", "training_returns.png"} <= plots
    model = mg.load_run(out)
    assert isinstance(model, PolicyMAML)
    mean, _ = model(torch.zeros(5, 2))
    assert mean.shape == (5, 2)


@pytest.mark.parametrize(
    "name,method",
    [
        ("rl-cheetah-vel", "maml"),
        ("rl-cheetah-dir", "oracle"),
        ("rl-ant-vel", "pretrain"),
        ("rl-ant-dir", "maml"),
    ],
)
def test_locomotion_presets_smoke(tmp_path, capsys, name, method):
    small = ["--set", "meta_batch=2", "--set", "rollouts=2", "--set", "horizon=8"]
    small += ["--set", "iterations=1", "--set", "eval_steps=1", "--set", f"method={method}"]
    assert main(["train", name, *small, *SMOKE, "--out", str(tmp_path / name)]) == 0
    result = json.loads((tmp_path / name / "eval.json").read_text())
    assert result["method"] == method and len(result["results"]["trained"]["return"]) == 2
    assert np.isfinite(result["results"]["trained"]["return"]).all()


@pytest.mark.parametrize(
    "setting,needle",
    [
        ("hvp=bogus", "hvp"),
        ("env=metagrad/Nope-v0", "unknown env"),
        ("method=reptile", "method"),
        ("gamma=1.5", "gamma"),
        ("rollouts=0", "rollouts"),
    ],
)
def test_bad_config_is_a_one_line_error(tmp_path, capsys, setting, needle):
    code = main(["train", "rl-nav2d", "--set", setting, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("metagrad: error:") and needle in err[-1]
    assert not any("Traceback" in line for line in err)
