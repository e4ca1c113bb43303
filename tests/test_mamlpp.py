"""MAML++: each component against its definition or an explicit float64 reference."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metagrad as mg
from metagrad.algorithms import msl_weights
from metagrad.models import StepBatchNorm, mamlpp_conv4

STEPS = 3


class StepNet(nn.Module):
    """A small model with per-step BatchNorm; its forward takes the inner step."""

    def __init__(self, stats: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = StepBatchNorm(4, STEPS, track_running_stats=stats)
        self.out = nn.Linear(4, 2)
        with torch.no_grad():  # distinct rows, so that using the wrong one shows
            self.bn.weight.copy_(1 + torch.rand(STEPS, 4))
            self.bn.bias.copy_(torch.randn(STEPS, 4))

    def forward(self, x, step=None):
        return self.out(torch.tanh(self.bn(self.fc(x), step)))


ADAPTS = ("fc.weight", "fc.bias", "out.weight", "out.bias")  # BatchNorm meta-learned only


def no_norm(name: str) -> bool:
    return not name.startswith("bn.")


def reference(params, rates, task, weights, rows=None):
    """The per-step model written out: step k's support pass and the query pass after step k
    use BatchNorm row k (``rows`` overrides which row), plain SGD at per-step rates."""
    sx, sy, qx, qy = task

    def f(p, x, k):
        h = x @ p["fc.weight"].T + p["fc.bias"]
        h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)
        r = k if rows is None else rows(k)
        h = h * p["bn.weight"][r] + p["bn.bias"][r]
        return torch.tanh(h) @ p["out.weight"].T + p["out.bias"]

    p, total = dict(params), 0.0
    for k in range(STEPS):
        loss = F.mse_loss(f(p, sx, k), sy)
        gs = torch.autograd.grad(loss, [p[n] for n in ADAPTS], create_graph=True)
        p = p | {n: p[n] - rates[n][k] * g for n, g in zip(ADAPTS, gs, strict=True)}
        if weights is not None:
            total = total + weights[k] * F.mse_loss(f(p, qx, k), qy)
    return total if weights is not None else F.mse_loss(f(p, qx, STEPS - 1), qy)


def batch(tasks=3, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(tasks, n, d, generator=g, dtype=torch.float64) for d in (3, 2, 3, 2))


@pytest.mark.parametrize("vectorize", [False, True, "support"])
@pytest.mark.parametrize("multi_step", [True, False])
def test_per_step_batchnorm_and_lslr_match_the_explicit_reference(vectorize, multi_step):
    torch.manual_seed(0)
    model = StepNet().double()
    pp = mg.MAMLpp(model, F.mse_loss, 0.1, STEPS, adapt=no_norm, vectorize=vectorize,
                   multi_step_loss=multi_step, msl_epochs=4)  # fmt: skip
    with torch.no_grad():
        for r in pp.learned_lrs().values():
            r.copy_(0.05 + 0.1 * torch.rand(STEPS, dtype=torch.float64))
    pp.schedule(500)  # epoch 1: annealed weights
    data = batch()
    loss = pp.meta_backward(*data)
    assert pp.strategy(data, steps=STEPS, first_order=False).vectorize == vectorize

    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    rates = {n: r.detach().clone().requires_grad_() for n, r in pp.learned_lrs().items()}
    weights = msl_weights(STEPS, 1, 4) if multi_step else None
    ref = sum(reference(params, rates, t, weights) for t in zip(*data, strict=True)) / 3
    wrt = [*params.values(), *rates.values()]
    grads = torch.autograd.grad(ref, wrt)
    ours = [p.grad for p in model.parameters()] + [r.grad for r in pp.learned_lrs().values()]
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    for a, b in zip(ours, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # the rows matter: row 0 at every step is another function
    row0 = sum(reference(params, rates, t, weights, rows=lambda k: 0) for t in zip(*data, strict=True)) / 3  # fmt: skip
    assert abs(row0.item() - ref.item()) > 1e-3


def test_adapted_model_and_curves_use_each_steps_row():
    torch.manual_seed(1)
    model = StepNet().double()
    pp = mg.MAML(model, F.mse_loss, 0.1, STEPS, adapt=no_norm)
    sx, sy, qx, qy = (t[0] for t in batch(tasks=1))
    for steps in (1, 2, 3, 5):  # past the last row: the last row
        fast = pp.adapt(sx, sy, steps=steps)
        assert fast.step == steps - 1
        expect = torch.tanh(F.batch_norm(qx @ fast.params["fc.weight"].T + fast.params["fc.bias"], None, None,
                                         model.bn.weight[min(steps - 1, STEPS - 1)],
                                         model.bn.bias[min(steps - 1, STEPS - 1)], training=True))  # fmt: skip
        expect = expect @ fast.params["out.weight"].T + fast.params["out.bias"]
        torch.testing.assert_close(fast(qx), expect, rtol=1e-12, atol=1e-12)
    curves = pp.adaptation_curve(*(t.unsqueeze(0) for t in (sx, sy, qx, qy)), steps=2,
                                 metrics={"mse": F.mse_loss})  # fmt: skip
    for k in (1, 2):
        fast = pp.adapt(sx, sy, steps=k, first_order=True)
        assert curves["mse"][0, k].item() == pytest.approx(
            F.mse_loss(fast(qx), qy).item(), rel=1e-10
        )


def test_per_step_running_statistics_are_each_steps_own():
    """Training mode: step k's passes update row k only (momentum 0.1, unbiased variance);
    eval mode: step k normalises with row k's statistics."""
    torch.manual_seed(2)
    model = StepNet(stats=True).double()
    maml = mg.MAML(model, F.mse_loss, 0.1, 2, adapt=no_norm)
    assert maml.strategy(batch(1), steps=2, first_order=False).vectorize is False  # in place
    sx, sy, qx, qy = (t[0] for t in batch(tasks=1))
    # pre-norm activations of each pass, from the same adaptation written out
    p = {n: t.detach().clone().requires_grad_() for n, t in model.named_parameters()}
    seen = {0: [], 1: []}
    for k in range(2):
        h = sx @ p["fc.weight"].T + p["fc.bias"]
        seen[k].append(h.detach())
        hn = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5) * p["bn.weight"][k] + p["bn.bias"][k]  # fmt: skip
        loss = F.mse_loss(torch.tanh(hn) @ p["out.weight"].T + p["out.bias"], sy)
        gs = torch.autograd.grad(loss, [p[n] for n in ADAPTS])
        p = p | {
            n: (p[n] - 0.1 * g).detach().requires_grad_() for n, g in zip(ADAPTS, gs, strict=True)
        }
    seen[1].append((qx @ p["fc.weight"].T + p["fc.bias"]).detach())  # the query after step 1
    maml.meta_loss(*(t.unsqueeze(0) for t in (sx, sy, qx, qy)))
    for k in (0, 1):
        mean, var = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
        for h in seen[k]:
            mean, var = 0.9 * mean + 0.1 * h.mean(0), 0.9 * var + 0.1 * h.var(0, unbiased=True)
        torch.testing.assert_close(model.bn.running_mean[k], mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(model.bn.running_var[k], var, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.bn.running_mean[2], torch.zeros(4, dtype=torch.float64))
    model.eval()
    h = qx @ model.fc.weight.T + model.fc.bias
    for k in (0, 1):
        bn = model.bn
        expect = (h - bn.running_mean[k]) / torch.sqrt(bn.running_var[k] + 1e-5) * bn.weight[k] + bn.bias[k]  # fmt: skip
        torch.testing.assert_close(bn(h, k), expect, rtol=1e-12, atol=1e-12)


def test_msl_weights_follow_the_schedule():
    assert msl_weights(5, 0, 10) == pytest.approx([0.2] * 5)
    assert msl_weights(5, 3, 10) == pytest.approx([0.14] * 4 + [0.44])
    assert msl_weights(5, 9, 10) == pytest.approx([0.02] * 4 + [0.92])
    assert msl_weights(5, 10, 10) is None  # then the last step's loss alone
    # the floor 0.03/steps and the cap 1 - (steps-1)*floor
    assert msl_weights(5, 49, 50) == pytest.approx([0.006] * 4 + [0.976])
    for e in range(10):
        assert sum(msl_weights(5, e, 10)) == pytest.approx(1.0)
    pp = mg.MAMLpp(nn.Linear(2, 1), F.mse_loss, 0.1, 5, msl_epochs=10, epoch_iterations=7)
    for it, epoch in ((0, 0), (6, 0), (7, 1), (69, 9)):
        pp.schedule(it)
        assert pp.step_weights.tolist() == pytest.approx(msl_weights(5, epoch, 10))
    pp.schedule(70)
    assert pp.step_weights is None


def _grads(maml, data):
    for p in maml.parameters():
        p.grad = None
    maml.meta_backward(*data)
    return [p.grad.clone() for p in maml.model.parameters()]


def test_derivative_order_annealing_switches_at_the_configured_iteration():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    data = batch()
    pp = mg.MAMLpp(model, F.mse_loss, 0.1, 2, lslr=False, multi_step_loss=False,
                   first_order_epochs=2, epoch_iterations=3)  # fmt: skip
    fo = _grads(mg.MAML(model, F.mse_loss, 0.1, 2, first_order=True), data)
    so = _grads(mg.MAML(model, F.mse_loss, 0.1, 2), data)
    assert any(not torch.allclose(a, b) for a, b in zip(fo, so, strict=True))
    for it, expect in ((0, fo), (5, fo), (6, so), (100, so)):
        pp.schedule(it)
        assert pp.first_order == (expect is fo)
        for a, b in zip(_grads(pp, data), expect, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_components_switch_off():
    model = nn.Linear(2, 1)
    plain = mg.MAMLpp(model, F.mse_loss, 0.1, 3, lslr=False, multi_step_loss=False)
    assert plain.learned_lrs() == {} and plain.step_weights is None and not plain.first_order
    assert all(r.shape == (3,) for r in mg.MAMLpp(model, F.mse_loss, 0.1, 3).learned_lrs().values())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"msl_epochs": -1}, "msl_epochs"),
        ({"epoch_iterations": 0}, "epoch_iterations"),
        ({"first_order_epochs": -2}, "first_order_epochs"),
    ],
)
def test_bad_mamlpp_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mg.MAMLpp(nn.Linear(2, 1), F.mse_loss, **kwargs)


def test_mamlpp_refuses_the_settings_it_owns():
    with pytest.raises(TypeError, match="learn_lr"):
        mg.MAMLpp(nn.Linear(2, 1), F.mse_loss, learn_lr="per-parameter")
    with pytest.raises(TypeError, match="step_weights"):
        mg.MAMLpp(nn.Linear(2, 1), F.mse_loss, step_weights=[1.0])


def test_step_batchnorm_rejects_bad_input():
    with pytest.raises(ValueError, match="steps >= 1"):
        StepBatchNorm(4, 0)
    with pytest.raises(ValueError, match=r"\[N, C, \.\.\.\]"):
        StepBatchNorm(4, 2)(torch.randn(4))


def test_the_mamlpp_network_shapes():
    for image, channels, filters in ((28, 1, 64), (84, 3, 48)):
        net = mamlpp_conv4(5, 5, image=image, in_channels=channels, filters=filters)
        x = torch.randn(2, channels, image, image)
        assert net(x).shape == (2, 5) and net(x, step=4).shape == (2, 5)
        assert net.features[0][1].weight.shape == (5, filters)


def test_cosine_floor_formula():
    from metagrad.experiments.config import preset
    from metagrad.experiments.registry import experiment_for

    cfg = preset("sinusoid") | {"preset": "sinusoid", "iterations": 8, "lr_schedule": "cosine",
                                "min_meta_lr": 1e-4}  # fmt: skip
    exp = experiment_for(cfg)
    opt = exp.optimizer(exp.build())
    sched = exp.scheduler(opt)
    lr0, lrs = cfg["meta_lr"], []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expect = [1e-4 + (lr0 - 1e-4) * (1 + math.cos(math.pi * t / 8)) / 2 for t in range(8)]
    assert lrs == pytest.approx(expect, rel=1e-9)


# ---------------------------------------------------------------- presets and training
OMNIGLOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"
QUICK = ["--set", "iterations=2", "--set", "val_every=2", "--set", "val_tasks=4",
         "--set", "eval_tasks=4", "--quiet"]  # fmt: skip


def test_mamlpp_presets_follow_the_reference_configs():
    from metagrad.experiments.config import preset, presets

    names = [n for n in presets() if n.endswith("-mamlpp")]
    assert sorted(names) == sorted(f"{s}-mamlpp" for s in (
        "omniglot-5w1s", "omniglot-5w5s", "omniglot-20w1s", "omniglot-20w5s",
        "miniimagenet-5w1s", "miniimagenet-5w5s"))  # fmt: skip
    for name in names:
        cfg = preset(name)
        assert (cfg["algorithm"], cfg["model"], cfg["inner_steps"], cfg["eval_steps"]) == ("mamlpp", "conv4-mamlpp", 5, 5)  # fmt: skip
        assert (cfg["lr_schedule"], cfg["iterations"], cfg["epoch_iterations"]) == ("cosine", 50_000, 500)  # fmt: skip
        omniglot = name.startswith("omniglot")
        assert cfg["meta_batch"] == (8 if omniglot else 2)
        assert cfg["inner_lr"] == (0.1 if omniglot else 0.01)
        assert cfg["filters"] == (64 if omniglot else 48)
        assert cfg["msl_epochs"] == (10 if omniglot else 15)


def test_ablation_keys_reach_the_learner():
    from metagrad.experiments.config import preset
    from metagrad.experiments.registry import experiment_for

    base = preset("omniglot-20w1s-mamlpp") | {"preset": "omniglot-20w1s-mamlpp", "filters": 4}
    full = experiment_for(base).build()
    assert isinstance(full, mg.MAMLpp) and full.learned_lrs() and full.step_weights is not None
    assert full.model.features[0][1].weight.shape == (5, 4)
    off = experiment_for(base | {"lslr": False, "multi_step_loss": False, "first_order_epochs": 3,
                                 "bn_per_step_weights": False}).build()  # fmt: skip
    assert not off.learned_lrs() and off.step_weights is None and off.first_order
    assert off.model.features[0][1].weight.shape == (4,)


def test_a_mamlpp_run_with_its_schedules_resumes_exactly(tmp_path):
    """Sinusoid MAML++ with short epochs, so that the multi-step weights, the derivative
    order and the cosine rate all change around the crash (iteration 13, checkpoint 10)."""
    from test_reliability import crash_and_resume

    from metagrad.experiments.config import preset

    cfg = preset("sinusoid") | {
        "preset": "sinusoid", "algorithm": "mamlpp", "inner_steps": 2, "iterations": 30,
        "checkpoint_every": 10, "log_every": 10, "lr_schedule": "cosine", "min_meta_lr": 1e-4,
        "epoch_iterations": 4, "msl_epochs": 4, "first_order_epochs": 3, "tensorboard": "false",
    }  # fmt: skip
    crash_and_resume(cfg, tmp_path)
    assert not (tmp_path / "a" / "tensorboard").exists()  # tensorboard=false


@pytest.mark.slow
def test_omniglot_mamlpp_preset_trains_and_writes_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from metagrad.cli import main

    if not (OMNIGLOT / "images_background.zip").is_file():
        pytest.skip(f"Omniglot not found in {OMNIGLOT}")
    out = tmp_path / "pp"
    args = ["train", "omniglot-5w1s-mamlpp", "--out", str(out), "--data-dir", str(OMNIGLOT),
            *QUICK, "--set", "filters=8", "--set", "log_every=1"]  # fmt: skip
    assert main(args) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/accuracy", "val/accuracy", "meta_lr"} <= tags
    assert "inner_lr/head.weight/step4" in tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    maml = mg.load_run(out)
    assert isinstance(maml, mg.MAMLpp)
    x = torch.rand(5, 1, 28, 28)
    assert maml.adapt(x, torch.arange(5))(x).shape == (5, 5)
