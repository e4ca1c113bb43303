"""Reptile and iMAML, in float64 against explicit references: Reptile's ``.grad`` against a
hand-written loop of SGD steps; iMAML's meta-gradient against the closed form on
least-squares tasks, where the regularised inner problem and its implicit gradient have
exact solutions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_core import make_case
from torch import nn

import metagrad as mg


def reptile_reference(model, loss_fn, data, lr, steps, orders=None):
    """theta - mean_t phi_t, phi_t after ``steps`` SGD steps on task t's support: full-batch,
    or step k on the examples ``orders[t][k]``."""
    theta = {n: p.detach() for n, p in model.named_parameters()}
    total = {n: torch.zeros_like(p) for n, p in theta.items()}
    sx, sy, _, _ = data
    for t in range(sx.shape[0]):
        phi = {n: p.clone().requires_grad_() for n, p in theta.items()}
        for k in range(steps):
            idx = slice(None) if orders is None else orders[t][k]
            out = torch.func.functional_call(model, phi, (sx[t][idx],))
            gs = torch.autograd.grad(loss_fn(out, sy[t][idx]), list(phi.values()))
            phi = {
                n: (p - lr * g).detach().requires_grad_()
                for (n, p), g in zip(phi.items(), gs, strict=True)
            }
        for n in theta:
            total[n] += (theta[n] - phi[n].detach()) / sx.shape[0]
    return total


@pytest.mark.parametrize("kind", ["mlp", "conv_bn"])
@pytest.mark.parametrize("vectorize", [False, True])
def test_reptile_grad_is_theta_minus_the_mean_adapted_parameters(kind, vectorize):
    model, loss_fn, data = make_case(kind)
    expected = reptile_reference(model, loss_fn, data, lr=0.05, steps=3)
    reptile = mg.Reptile(model, loss_fn, inner_lr=0.05, inner_steps=3, vectorize=vectorize)
    loss = reptile.meta_backward(*data)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-10, atol=1e-12)
    # the reported loss: the query loss after adaptation
    assert loss.shape == () and torch.isfinite(loss)
    # .grad accumulates, as backward() does
    reptile.meta_backward(*data)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * expected[n], rtol=1e-10, atol=1e-12)


def test_reptile_with_sgd_at_eps_is_the_papers_update():
    model, loss_fn, data = make_case("mlp")
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = reptile_reference(model, loss_fn, data, lr=0.02, steps=2)
    reptile = mg.Reptile(model, loss_fn, inner_lr=0.02, inner_steps=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    reptile.meta_backward(*data)
    opt.step()
    for n, p in model.named_parameters():  # theta + eps (mean phi - theta)
        torch.testing.assert_close(p.detach(), theta[n] - 0.5 * ref[n])


def test_reptile_minibatch_order_is_shuffled_passes_cut_into_batches():
    g = torch.Generator().manual_seed(3)
    order = mg.algorithms.reptile.minibatch_order(10, 4, 6, g)  # 24 indices: 3 passes of 10
    assert order.shape == (6, 4)
    flat = order.flatten()
    for start in (0, 10):  # each complete pass is a permutation of 0..9
        assert sorted(flat[start : start + 10].tolist()) == list(range(10))
    assert len(set(flat[20:].tolist())) == 4  # the third pass, begun: no repeats
    assert not torch.equal(flat[:10], flat[10:20])  # shuffled anew at each pass


@pytest.mark.parametrize("kind", ["mlp", "conv_bn"])
def test_reptile_minibatch_steps_match_a_hand_written_loop(kind):
    """inner_batch: step k of task t runs on the k-th mini-batch of its support set, drawn
    from torch's global generator task by task (SGD here, the reference by hand)."""
    model, loss_fn, data = make_case(kind)
    sx, sy, _, _ = data
    size, batch, steps, lr = sx.shape[1], 3, 4, 0.05
    torch.manual_seed(11)
    orders = [mg.algorithms.reptile.minibatch_order(size, batch, steps) for _ in range(sx.shape[0])]
    expected = reptile_reference(model, loss_fn, data, lr, steps, orders)
    reptile = mg.Reptile(model, loss_fn, inner_lr=lr, inner_steps=steps, inner_batch=batch, adapt=None)  # fmt: skip
    torch.manual_seed(11)
    reptile.meta_backward(*data)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-10, atol=1e-12)


def test_reptile_minibatch_of_the_whole_support_is_the_full_batch_step():
    model, loss_fn, data = make_case("mlp")  # no normalisation: the order of examples is moot
    size = data[0].shape[1]
    grads = []
    for inner_batch in (None, size):
        model.zero_grad()
        mg.Reptile(model, loss_fn, inner_lr=0.05, inner_steps=3, inner_batch=inner_batch).meta_backward(*data)  # fmt: skip
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-10, atol=1e-12)


def test_reptile_minibatch_larger_than_the_support_set_is_refused():
    model, loss_fn, data = make_case("mlp")
    reptile = mg.Reptile(model, loss_fn, inner_batch=data[0].shape[1] + 1)
    with pytest.raises(ValueError, match="exceeds the"):
        reptile.meta_backward(*data)


def carried_adam_reference(model, loss_fn, data, lr, steps, betas, eps, state):
    """theta - mean_t phi_t with one Adam for every task, in order: its moments and step
    count go on from task to task (``state``: {"t": count, name: (m, v)}, updated)."""
    b1, b2 = betas
    theta = {n: p.detach() for n, p in model.named_parameters()}
    total = {n: torch.zeros_like(p) for n, p in theta.items()}
    sx, sy, _, _ = data
    for t in range(sx.shape[0]):
        phi = {n: p.clone().requires_grad_() for n, p in theta.items()}
        for _ in range(steps):
            out = torch.func.functional_call(model, phi, (sx[t],))
            gs = torch.autograd.grad(loss_fn(out, sy[t]), list(phi.values()))
            state["t"] += 1
            new = {}
            for (n, p), g in zip(phi.items(), gs, strict=True):
                m, v = state.get(n, (torch.zeros_like(g), torch.zeros_like(g)))
                m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
                state[n] = (m, v)
                d = (m / (1 - b1 ** state["t"])) / ((v / (1 - b2 ** state["t"])).sqrt() + eps)
                new[n] = (p - lr * d).detach().requires_grad_()
            phi = new
        for n in theta:
            total[n] += (theta[n] - phi[n].detach()) / sx.shape[0]
    return total


def test_reptile_carried_adam_state_matches_one_adam_for_every_task():
    """carry_inner_state: as the paper's code, one Adam serves every task of every
    meta-iteration; the state lives in the learner's buffers, so a reloaded learner goes on
    exactly; test-time adaptation starts from it and leaves it alone."""
    model, loss_fn, data = make_case("mlp")
    betas, eps, lr, steps = (0.0, 0.999), 1e-8, 0.01, 3
    rule = mg.inner.Adam(betas=betas, eps=eps)
    reptile = mg.Reptile(model, loss_fn, inner_lr=lr, inner_steps=steps, inner_optimizer=rule,
                         carry_inner_state=True, adapt=None)  # fmt: skip
    state = {"t": 0}
    for _ in range(2):  # two meta-iterations at the same theta: the state alone differs
        expected = carried_adam_reference(model, loss_fn, data, lr, steps, betas, eps, state)
        model.zero_grad()
        reptile.meta_backward(*data)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[n], rtol=1e-10, atol=1e-12)
    assert int(reptile.inner_step_count) == state["t"] == 2 * data[0].shape[0] * steps
    for n, (m, v) in reptile.carried_state().items():
        torch.testing.assert_close(m, state[n][0], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(v, state[n][1], rtol=1e-12, atol=1e-15)
    # a fresh learner loaded from the state dict goes on as this one
    other = mg.Reptile(model, loss_fn, inner_lr=lr, inner_steps=steps, inner_optimizer=rule,
                       carry_inner_state=True, adapt=None)  # fmt: skip
    other.load_state_dict(reptile.state_dict())
    model.zero_grad()
    other.meta_backward(*data)
    g_other = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reptile.meta_backward(*data)
    for n, p in model.named_parameters():
        torch.testing.assert_close(g_other[n], p.grad, rtol=0, atol=0)
    # test-time adaptation: one Adam step from the carried state, which stays as it was
    before = {n: v.clone() for n, (_, v) in reptile.carried_state().items()}
    count = int(reptile.inner_step_count)
    fast = reptile.adapt(data[0][0], data[1][0], steps=1)
    t = count + 1
    for n, p in model.named_parameters():
        m0, v0 = reptile.carried_state()[n]
        g = torch.autograd.grad(loss_fn(torch.func.functional_call(model, dict(model.named_parameters()), (data[0][0],)), data[1][0]), p)[0]  # fmt: skip
        m, v = betas[0] * m0 + (1 - betas[0]) * g, betas[1] * v0 + (1 - betas[1]) * g * g
        d = (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
        torch.testing.assert_close(fast.params[n], p - lr * d, rtol=1e-10, atol=1e-12)
        assert torch.equal(reptile.carried_state()[n][1], before[n])
    assert int(reptile.inner_step_count) == count


def test_reptile_carry_needs_adam():
    model, loss_fn, _ = make_case("mlp")
    with pytest.raises(ValueError, match="carry_inner_state needs an Adam inner optimizer"):
        mg.Reptile(model, loss_fn, carry_inner_state=True)


def least_squares(tasks=3, d=4, m=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tasks, 2 * m, d, generator=g, dtype=torch.float64)
    w = torch.randn(tasks, d, 1, generator=g, dtype=torch.float64)
    y = x @ w + 0.1 * torch.randn(tasks, 2 * m, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    return model, (x[:, :m], y[:, :m], x[:, m:], y[:, m:])


def imaml_closed_form(theta, data, lam):
    """For L(w) = mean (x w - y)^2: H = 2/m X'X, the inner optimum solves
    (H + lam I) phi = lam theta + 2/m X'y, and the meta-gradient is (I + H/lam)^-1 grad L_q."""
    sx, sy, qx, qy = data
    d = theta.shape[0]
    eye = torch.eye(d, dtype=theta.dtype)
    total = torch.zeros(d, dtype=theta.dtype)
    for t in range(sx.shape[0]):
        m, mq = sx.shape[1], qx.shape[1]
        h = 2 / m * sx[t].T @ sx[t]
        phi = torch.linalg.solve(h + lam * eye, lam * theta + 2 / m * sx[t].T @ sy[t, :, 0])
        gq = 2 / mq * qx[t].T @ (qx[t] @ phi - qy[t, :, 0])
        total += torch.linalg.solve(eye + h / lam, gq) / sx.shape[0]
    return total


def imaml_grad(model, data, *, steps, cg_steps, lam=1.0, lr=0.1, vectorize=False):
    model.zero_grad()
    imaml = mg.iMAML(model, F.mse_loss, inner_lr=lr, inner_steps=steps, lam=lam,
                     cg_steps=cg_steps, vectorize=vectorize)  # fmt: skip
    imaml.meta_backward(*data)
    assert imaml.batched(data) is bool(vectorize)
    return model.weight.grad[0].clone()


@pytest.mark.parametrize("vectorize", [False, True])
def test_imaml_meta_gradient_equals_the_closed_form_on_least_squares(vectorize):
    model, data = least_squares()
    expected = imaml_closed_form(model.weight.detach()[0], data, lam=1.0)
    # exact inner solution (the GD error contracts by (1 - lr * lam) per step at least) and
    # CG run to the dimension (exact for a 4x4 system)
    got = imaml_grad(model, data, steps=600, cg_steps=4, vectorize=vectorize)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


def test_imaml_tends_to_the_closed_form_as_inner_and_cg_steps_grow():
    model, data = least_squares(d=6)
    expected = imaml_closed_form(model.weight.detach()[0], data, lam=1.0)
    errors = [
        (imaml_grad(model, data, steps=s, cg_steps=c) - expected).norm().item()
        for s, c in ((1, 1), (4, 2), (16, 3), (64, 6), (600, 6))
    ]
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-9 * expected.norm().item()


def test_imaml_tasks_under_vmap_equal_the_loop():
    """A small dense net: vmap by default (after the float64 check), the loop's gradient."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = tuple(torch.randn(4, 8, d, generator=g, dtype=torch.float64) for d in (3, 2, 3, 2))
    grads = {}
    for vectorize in (None, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).double()
        imaml = mg.iMAML(model, F.mse_loss, inner_lr=0.1, inner_steps=4, lam=0.5, cg_steps=3,
                         vectorize=vectorize)  # fmt: skip
        loss = imaml.meta_backward(*data)
        assert imaml.batched(data) is (vectorize is None)
        grads[vectorize] = (loss, [p.grad for p in model.parameters()])
    assert grads[None][0].item() == pytest.approx(grads[False][0].item(), rel=1e-12)
    for a, b in zip(grads[None][1], grads[False][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)


def test_masked_conjugate_gradient_holds_the_early_stop_iterate():
    from metagrad.core import linalg

    a = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    b = torch.tensor([1.0, 2.0], dtype=torch.float64)
    plain = linalg.conjugate_gradient(lambda v: a @ v, b, iters=10)  # stops after 2
    masked = linalg.conjugate_gradient(lambda v: a @ v, b, iters=10, masked=True)
    assert torch.equal(plain, masked)
    torch.testing.assert_close(masked, torch.linalg.solve(a, b))


def test_imaml_reported_loss_and_outputs():
    model, data = least_squares()
    imaml = mg.iMAML(model, F.mse_loss, inner_lr=0.1, inner_steps=5, lam=1.0, cg_steps=3)
    loss, out = imaml.meta_backward(*data, return_outputs=True)
    assert out.shape == data[3].shape and loss.shape == ()


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (mg.iMAML, {"lam": 0.0}, "lam > 0"),
        (mg.iMAML, {"lam": -1.0}, "lam > 0"),
        (mg.iMAML, {"cg_steps": 0}, "cg_steps >= 1"),
        (mg.iMAML, {"inner_steps": 0}, "inner_steps >= 1"),
        (mg.iMAML, {"vectorize": "support"}, "None, True or False"),
        (mg.Reptile, {"inner_steps": 0}, "inner_steps >= 1"),
        (mg.Reptile, {"inner_lr": 0.0}, "inner_lr must be > 0"),
        (mg.Reptile, {"inner_batch": 0}, "inner_batch must be a positive"),
    ],
)
def test_bad_arguments_give_one_clear_error(cls, kwargs, match):
    model, _ = least_squares()
    with pytest.raises(ValueError, match=match):
        cls(model, F.mse_loss, **kwargs)


@pytest.mark.parametrize("cls", [mg.iMAML, mg.Reptile])
def test_options_without_meaning_are_refused_and_meta_loss_points_to_meta_backward(cls):
    model, data = least_squares()
    for key, value in (
        ("learn_lr", "per-parameter"),
        ("step_weights", [1.0]),
        ("first_order", True),
    ):
        with pytest.raises(TypeError, match=key):
            cls(model, F.mse_loss, **{key: value})
    with pytest.raises(TypeError, match="meta_backward"):
        cls(model, F.mse_loss).meta_loss(*data)
