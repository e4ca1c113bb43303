"""The algorithm family on the core, exact in float64 against references written out from
the papers' update rules (ANIL, Meta-SGD, MAML++ LSLR and multi-step loss, inner momentum
and Adam with torch.optim's formulas), under every execution strategy."""

from __future__ import annotations

import math

import pytest
import torch
from test_core import make_case
from torch.func import functional_call

import metagrad as mg


def reference(model, loss_fn, data, *, steps, first_order, adapts, rate, rule, weights):
    """Meta-loss and meta-gradient by hand: a loop over tasks with torch.autograd.grad.

    ``rate(name, k)`` is the inner rate (a float or a tensor that requires grad); ``rule``
    is "sgd", ("momentum", mu) or ("adam", b1, b2, eps); ``weights`` the per-step weights of
    the outer loss or None (last step only)."""
    names = [n for n, _ in model.named_parameters()]
    theta = dict(model.named_parameters())
    total = 0.0
    for sx, sy, qx, qy in zip(*data, strict=True):
        fast = dict(theta)
        m = {n: torch.zeros_like(theta[n]) for n in adapts}
        v = {n: torch.zeros_like(theta[n]) for n in adapts}
        task = 0.0
        for k in range(steps):
            inner = loss_fn(functional_call(model, fast, (sx,)), sy)
            gs = torch.autograd.grad(inner, [fast[n] for n in adapts], create_graph=not first_order)
            fast = dict(fast)
            for n, g in zip(adapts, gs, strict=True):
                if rule == "sgd":
                    d = g
                elif rule[0] == "momentum":
                    m[n] = rule[1] * m[n] + g
                    d = m[n]
                else:
                    _, b1, b2, eps = rule
                    m[n] = b1 * m[n] + (1 - b1) * g
                    v[n] = b2 * v[n] + (1 - b2) * g * g
                    mhat, vhat = m[n] / (1 - b1 ** (k + 1)), v[n] / (1 - b2 ** (k + 1))
                    # sqrt with derivative 0 at 0 (dead ReLU units give exactly zero
                    # gradients; the plain sqrt's inf * 0 would make the reference NaN)
                    root = torch.where(vhat > 0, vhat, 1.0).sqrt() * (vhat > 0)
                    d = mhat / (root + eps)
                fast[n] = fast[n] - rate(n, k) * d
            if weights is not None:
                task = task + weights[k] * loss_fn(functional_call(model, fast, (qx,)), qy)
        if weights is None:
            task = loss_fn(functional_call(model, fast, (qx,)), qy)
        total = total + task
    loss = total / len(data[0])
    return loss, names


def grads_of(loss, tensors):
    gs = torch.autograd.grad(loss, list(tensors.values()), allow_unused=True)
    return {
        k: torch.zeros_like(t) if g is None else g
        for (k, t), g in zip(tensors.items(), gs, strict=True)
    }


def _algorithm(option, model, loss_fn, steps, first_order, vectorize):
    common = dict(inner_steps=steps, first_order=first_order, vectorize=vectorize)
    head = "head" if hasattr(model, "head") else "4"
    if option == "anil":
        return mg.ANIL(model, loss_fn, head=head, inner_lr=0.1, **common)
    if option == "metasgd":
        return mg.MetaSGD(model, loss_fn, inner_lr=0.1, **common)
    if option == "lslr-multistep":
        return mg.MAML(model, loss_fn, inner_lr=0.1, learn_lr="per-layer-per-step",
                       step_weights=[0.3, 0.7], **common)  # fmt: skip
    if option == "momentum":
        return mg.MAML(model, loss_fn, inner_lr=0.1, inner_optimizer=mg.inner.SGD(momentum=0.9), **common)  # fmt: skip
    if option == "adam":
        rule = mg.inner.Adam(betas=(0.8, 0.9), eps=1e-3)
        return mg.MAML(model, loss_fn, inner_lr=0.01, inner_optimizer=rule, **common)
    raise ValueError(option)


OPTIONS = ["anil", "metasgd", "lslr-multistep", "momentum", "adam"]


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("kind", ["mlp", "conv_bn"])
@pytest.mark.parametrize("vectorize", [False, True, "support"])
@pytest.mark.parametrize("first_order", [False, True])
def test_family_is_exact_against_the_papers_update_rules(option, kind, vectorize, first_order):
    model, loss_fn, data = make_case(kind)
    steps = 2
    maml = _algorithm(option, model, loss_fn, steps, first_order, vectorize).double()
    # learned rates moved off their start value, so that a wrong index or shape shows
    with torch.no_grad():
        for r in maml.learned_lrs().values():
            r.mul_(1 + 0.5 * torch.rand(r.shape, generator=torch.Generator().manual_seed(3), dtype=r.dtype))  # fmt: skip
    lrs = maml.learned_lrs()
    adapts = list(maml.adapts)

    def rate(n, k):
        if option == "metasgd":
            return lrs[n]
        if option == "lslr-multistep":
            return lrs[n][k]
        return maml.inner_lr

    rule = {"momentum": ("momentum", 0.9), "adam": ("adam", 0.8, 0.9, 1e-3)}.get(option, "sgd")
    weights = [0.3, 0.7] if option == "lslr-multistep" else None
    ref_loss, _ = reference(model, loss_fn, data, steps=steps, first_order=first_order,
                            adapts=adapts, rate=rate, rule=rule, weights=weights)  # fmt: skip
    wrt = dict(model.named_parameters()) | {f"lr:{k}": r for k, r in lrs.items()}
    ref = grads_of(ref_loss, wrt)
    if option == "anil":
        assert adapts == [n for n, _ in model.named_parameters() if n.startswith(("head.", "4."))]
    for path in ("meta_loss", "meta_backward"):
        maml.zero_grad(set_to_none=True)
        if path == "meta_loss":
            loss = maml.meta_loss(*data)
            loss.backward()
        else:
            loss = maml.meta_backward(*data)
        torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-10, atol=1e-12)
        got = dict(model.named_parameters()) | {f"lr:{k}": r for k, r in lrs.items()}
        for k, t in got.items():
            g = torch.zeros_like(t) if t.grad is None else t.grad
            torch.testing.assert_close(g, ref[k], rtol=1e-8, atol=1e-10, msg=f"{path} {k}")


def test_learned_rates_are_parameters_of_the_learner():
    model, loss_fn, data = make_case("mlp")
    maml = mg.MetaSGD(model, loss_fn, inner_lr=0.05)
    lrs = maml.learned_lrs()
    assert set(lrs) == {n for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        assert lrs[n].shape == p.shape and torch.all(lrs[n] == 0.05)
    ids = {id(p) for p in maml.parameters()}
    assert all(id(r) in ids for r in lrs.values())
    assert any(k.startswith("lrs.") for k in maml.state_dict())
    # an optimizer step moves them, and a state_dict round trip keeps them
    opt = torch.optim.SGD(maml.parameters(), lr=0.1)
    maml.meta_backward(*data)
    opt.step()
    assert not torch.all(lrs["0.weight"] == 0.05)
    other = mg.MetaSGD(make_case("mlp")[0], loss_fn, inner_lr=0.05)
    other.load_state_dict(maml.state_dict())
    for n, r in other.learned_lrs().items():
        assert torch.equal(r, lrs[n])
    lslr = mg.MAML(model, loss_fn, inner_steps=3, learn_lr="per-layer-per-step")
    assert all(r.shape == (3,) for r in lslr.learned_lrs().values())
    assert mg.MAML(model, loss_fn).learned_lrs() == {}


def test_adapt_and_adaptation_curve_use_learned_rates_and_the_rule():
    model, loss_fn, data = make_case("mlp")
    maml = mg.MAML(model, loss_fn, inner_lr=0.05, inner_steps=3, learn_lr="per-layer-per-step",
                   inner_optimizer=mg.inner.SGD(momentum=0.5))  # fmt: skip
    with torch.no_grad():
        for r in maml.learned_lrs().values():
            r.copy_(torch.tensor([0.02, 0.05, 0.1], dtype=r.dtype))
    curve = maml.adaptation_curve(*data, steps=3, metrics={"mse": loss_fn})["mse"]
    for t in range(3):
        sx, sy, qx, qy = (d[t] for d in data)
        p = {k: v.detach() for k, v in model.named_parameters()}
        buf = {}
        for k in range(3):
            with torch.enable_grad():
                q = {n: v.clone().requires_grad_() for n, v in p.items()}
                gs = torch.autograd.grad(
                    loss_fn(functional_call(model, q, (sx,)), sy), list(q.values())
                )
            lr = [0.02, 0.05, 0.1][k]
            for (n, v), g in zip(p.items(), gs, strict=True):
                buf[n] = g if k == 0 else 0.5 * buf[n] + g
                p[n] = v - lr * buf[n]
            expected = loss_fn(functional_call(model, p, (qx,)), qy)
            torch.testing.assert_close(curve[t, k + 1], expected.detach(), rtol=1e-9, atol=1e-12)
        fast = maml.adapt(sx, sy, steps=3)
        torch.testing.assert_close(fast(qx).detach(), functional_call(model, p, (qx,)))


def test_step_weights_can_change_between_iterations():
    model, loss_fn, data = make_case("mlp")
    maml = mg.MAML(model, loss_fn, inner_lr=0.1, inner_steps=2, step_weights=[1.0, 0.0])
    first = maml.meta_loss(*data)
    maml.step_weights = [0.0, 1.0]
    last = maml.meta_loss(*data)
    plain = mg.MAML(model, loss_fn, inner_lr=0.1, inner_steps=2).meta_loss(*data)
    one = mg.MAML(model, loss_fn, inner_lr=0.1, inner_steps=1).meta_loss(*data)
    torch.testing.assert_close(last, plain)
    torch.testing.assert_close(first, one)
    maml.step_weights = None
    torch.testing.assert_close(maml.meta_loss(*data), plain)


def test_compiled_family_matches_eager():
    """Learned rates and step weights are inputs of the compiled gradient: a new value is
    used at once, without recompiling a stale constant."""
    model, loss_fn, data = make_case("mlp")
    kw = dict(inner_lr=0.1, inner_steps=2, learn_lr="per-layer-per-step", step_weights=[0.5, 0.5])
    comp = mg.MAML(model, loss_fn, compile=True, vectorize=True, **kw).double()
    eager = mg.MAML(model, loss_fn, vectorize=True, **kw).double()
    eager.load_state_dict(comp.state_dict())
    for weights in ([0.5, 0.5], [0.1, 0.9]):
        comp.step_weights = eager.step_weights = weights
        grads = []
        for m in (comp, eager):
            m.zero_grad(set_to_none=True)
            loss = m.meta_backward(*data)
            grads.append((loss, [p.grad.clone() for p in m.parameters()]))
        (l0, g0), (l1, g1) = grads
        torch.testing.assert_close(l0, l1, rtol=1e-10, atol=1e-12)
        for a, b in zip(g0, g1, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_adam_with_an_unused_parameter_stays_finite():
    """Adam's sqrt(v) at v = 0 has an infinite derivative: an exactly zero inner gradient
    (here an unused parameter) must not make the second-order meta-gradient NaN."""
    model, loss_fn, data = make_case("mlp")
    model.add_module("unused", torch.nn.Linear(1, 1).double())
    maml = mg.MAML(model, loss_fn, inner_lr=0.01, inner_steps=2, inner_optimizer=mg.inner.Adam())
    maml.meta_backward(*data)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_forced_batching_that_cannot_be_exact_is_refused_for_the_family():
    model, loss_fn, data = make_case("conv_in")  # InstanceNorm: wrong second order under vmap
    with pytest.raises(ValueError, match="not exact.*wrong meta-gradient"):
        mg.MetaSGD(model, loss_fn, inner_lr=0.1, vectorize=True).meta_loss(*data)
    assert not mg.MetaSGD(model, loss_fn, inner_lr=0.1).strategy(data, steps=1, first_order=False).vectorize  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"learn_lr": "per-step"},
            ValueError,
            "learn_lr must be None, 'per-parameter' or 'per-layer-per-step'",
        ),  # fmt: skip
        (
            {"inner_steps": 2, "step_weights": [1.0]},
            ValueError,
            "step_weights has 1 weights for inner_steps=2",
        ),  # fmt: skip
        ({"step_weights": [math.nan]}, ValueError, "step_weights must be finite"),
        ({"adapt": ["nothing"]}, ValueError, "selects no parameter of the model"),
        ({"adapt": lambda n: False}, ValueError, "the adapt predicate selects no parameter"),
        ({"inner_optimizer": torch.optim.SGD}, TypeError, "inner_optimizer must be mg.inner"),
    ],
)
def test_bad_family_arguments_give_one_clear_error(kwargs, error, match):
    model, loss_fn, _ = make_case("mlp")
    with pytest.raises(error, match=match):
        mg.MAML(model, loss_fn, **kwargs)


def test_bad_anil_head_and_update_rules():
    model, loss_fn, _ = make_case("conv_bn")
    with pytest.raises(ValueError, match="ANIL head 'classifier' is not a submodule.*head"):
        mg.ANIL(model, loss_fn, head="classifier")
    with pytest.raises(ValueError, match="momentum must be in"):
        mg.inner.SGD(momentum=1.5)
    with pytest.raises(ValueError, match="Adam betas"):
        mg.inner.Adam(betas=(0.9, 1.0))
