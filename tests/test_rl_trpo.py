"""Conjugate gradient, KL Hessian-vector products and the TRPO line search."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from metagrad.core.linalg import gradient_step_jacobian
from metagrad.rl.policy import GaussianMLPPolicy, diag_gaussian_kl
from metagrad.rl.trpo import (
    conjugate_gradient,
    conjugate_gradient_residual,
    flatten,
    hvp_exact,
    hvp_finite_difference,
    line_search,
    trpo_step,
    unflatten,
)

D = torch.float64


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=D)
    return a @ a.T + 0.5 * torch.eye(n, dtype=D)


def test_conjugate_gradient_solves_spd_system() -> None:
    a = _spd(8, 0)
    b = torch.randn(8, generator=torch.Generator().manual_seed(1), dtype=D)
    x = conjugate_gradient(lambda v: a @ v, b, iters=10)  # n <= iters: exact up to rounding
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-6, atol=1e-8)
    x3 = conjugate_gradient(lambda v: a @ v, b, iters=3)
    err3 = (a @ x3 - b).norm()
    assert 1e-8 < err3 < b.norm()  # truncated CG: partial progress
    assert torch.equal(
        conjugate_gradient(lambda v: a @ v, torch.zeros(8, dtype=D)), torch.zeros(8, dtype=D)
    )


def test_conjugate_gradient_residual_is_b_minus_ax_when_truncated() -> None:
    a = _spd(8, 0)
    b = torch.randn(8, generator=torch.Generator().manual_seed(1), dtype=D)
    x, r = conjugate_gradient_residual(lambda v: a @ v, b, iters=3)
    torch.testing.assert_close(x, conjugate_gradient(lambda v: a @ v, b, iters=3))
    torch.testing.assert_close(r, b - a @ x, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(x @ (b - r), x @ a @ x, rtol=1e-9, atol=1e-11)


def test_flatten_unflatten_roundtrip() -> None:
    ts = [torch.randn(2, 3), torch.randn(4), torch.randn(1, 1, 2)]
    back = unflatten(flatten(ts), ts)
    assert all(torch.equal(a, b) for a, b in zip(ts, back, strict=True))
    with pytest.raises(ValueError):
        unflatten(torch.zeros(3), ts)


def _policy_kl_problem() -> tuple[GaussianMLPPolicy, list[torch.Tensor], object]:
    """KL(old || theta) of a tiny Gaussian MLP policy on fixed observations."""
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(3, 2, hidden_sizes=(5,)).double()
    names = [n for n, _ in policy.named_parameters()]
    theta0 = [p.detach().clone() for p in policy.parameters()]
    obs = torch.randn(16, 3, dtype=D)
    with torch.no_grad():
        old_mean, old_log_std = policy(obs)

    def kl_fn(ps):
        mean, log_std = functional_call(policy, dict(zip(names, ps, strict=True)), (obs,))
        return diag_gaussian_kl(old_mean, old_log_std, mean, log_std).mean()

    # Evaluate away from theta0 so the Hessian is not just the Fisher matrix.
    g = torch.Generator().manual_seed(5)
    theta = [t + 0.1 * torch.randn(t.shape, generator=g, dtype=D) for t in theta0]
    return policy, theta, kl_fn


def _flat_kl_problem():
    """The KL problem as a function of one flat vector, and its explicit Hessian."""
    _, theta, kl_fn = _policy_kl_problem()
    flat = flatten(theta)

    def kl_flat(x: torch.Tensor) -> torch.Tensor:
        return kl_fn(unflatten(x, theta))

    return theta, kl_fn, flat, kl_flat, torch.autograd.functional.hessian(kl_flat, flat)


def test_exact_hvp_matches_explicit_hessian_and_finite_differences() -> None:
    theta, kl_fn, flat, kl_flat, hess = _flat_kl_problem()
    v = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(2), dtype=D)
    damping = 1e-3
    hv = hvp_exact(kl_fn, theta, damping=damping)(v)
    torch.testing.assert_close(hv, hess @ v + damping * v, rtol=1e-8, atol=1e-10)
    # Central difference of the gradient along v, computed here independently.
    r = 1e-5
    gp = torch.autograd.functional.jacobian(kl_flat, flat + r * v)
    gm = torch.autograd.functional.jacobian(kl_flat, flat - r * v)
    torch.testing.assert_close(hv - damping * v, (gp - gm) / (2 * r), rtol=1e-5, atol=1e-7)
    # The same product twice (the gradient graph is reused).
    hvp = hvp_exact(kl_fn, theta, damping=0.0)
    torch.testing.assert_close(hvp(v), hvp(v))


def test_gradient_step_jacobian_is_identity_minus_lr_hessian() -> None:
    theta, kl_fn, flat, kl_flat, hess = _flat_kl_problem()
    grad = torch.autograd.functional.jacobian(kl_flat, flat)
    stepped, jacobian = gradient_step_jacobian(kl_fn, theta, 0.3)
    torch.testing.assert_close(flatten(stepped), flat - 0.3 * grad, rtol=1e-12, atol=1e-14)
    assert not any(t.requires_grad for t in stepped)
    # the step's Jacobian, explicitly: the derivative of p - lr grad(p)
    explicit = torch.autograd.functional.jacobian(
        lambda x: x - 0.3 * torch.autograd.functional.jacobian(kl_flat, x, create_graph=True),
        flat,
    )
    torch.testing.assert_close(explicit, torch.eye(flat.numel(), dtype=D) - 0.3 * hess)
    for seed in (2, 3):  # reusable: the gradient graph is kept
        v = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(seed), dtype=D)
        out = flatten(jacobian(unflatten(v, theta)))
        torch.testing.assert_close(out, explicit @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("symmetric", [True, False])
def test_finite_difference_hvp_close_to_exact(symmetric: bool) -> None:
    _, theta, kl_fn = _policy_kl_problem()
    v = torch.randn(flatten(theta).numel(), generator=torch.Generator().manual_seed(3), dtype=D)
    exact = hvp_exact(kl_fn, theta, damping=1e-5)(v)
    fd = hvp_finite_difference(kl_fn, theta, damping=1e-5, base_eps=1e-4, symmetric=symmetric)(v)
    tol = 1e-6 if symmetric else 1e-3
    assert (fd - exact).norm() <= tol * exact.norm()
    # maml_rl's effective step (base_eps = 1) on a gradient-sized vector: still close.
    u = 0.3 * v / v.norm()
    coarse = hvp_finite_difference(kl_fn, theta, damping=1e-5)(u)
    exact_u = hvp_exact(kl_fn, theta, damping=1e-5)(u)
    assert (coarse - exact_u).norm() <= 0.05 * exact_u.norm()


def test_line_search_accepts_backtracks_and_rejects() -> None:
    a = _spd(4, 7)
    x0 = [torch.zeros(4, dtype=D)]
    target = torch.tensor([1.0, -0.5, 0.3, 0.2], dtype=D)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return ((x - target) ** 2).sum()

    def kl(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x @ a @ x

    def eval_fn(ps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return loss(ps[0]), kl(ps[0])

    loss0 = float(loss(x0[0]))
    direction = target / target.norm()
    small = 0.5 * math.sqrt(2 * 0.01 / float(kl(direction) * 2)) * direction
    res = line_search(eval_fn, x0, [small], loss0, max_kl=0.01)
    assert res.accepted and res.backtracks == 0 and res.step_fraction == 1.0
    torch.testing.assert_close(res.params[0], small)
    # Too large: KL of the full step is 25x the limit, so it must shrink by >= 5.
    big = 5.0 * math.sqrt(2 * 0.01 / float(2 * kl(direction))) * direction * math.sqrt(2)
    res = line_search(eval_fn, x0, flatten([big]), loss0, max_kl=0.01)
    assert res.accepted and res.backtracks > 0
    assert res.kl <= 0.01 and res.loss < loss0
    assert res.step_fraction == pytest.approx(0.8**res.backtracks)
    assert float(kl(big * 0.8 ** (res.backtracks - 1))) > 0.01  # the previous try was too far
    # Uphill: no fraction lowers the loss -> old parameters, not accepted.
    res = line_search(eval_fn, x0, [-small], loss0, max_kl=0.01)
    assert not res.accepted and res.backtracks == 15 and res.step_fraction == 0.0
    assert torch.equal(res.params[0], x0[0])
    # NaN loss is never accepted.
    res = line_search(lambda ps: (torch.tensor(math.nan), kl(ps[0])), x0, [small], loss0)
    assert not res.accepted


@pytest.mark.parametrize("hvp", ["exact", "finite_difference"])
def test_trpo_step_on_quadratic_trust_region(hvp: str) -> None:
    a = _spd(6, 11)
    g = torch.randn(6, generator=torch.Generator().manual_seed(12), dtype=D)
    theta0 = [torch.zeros(2, dtype=D), torch.zeros(4, dtype=D)]

    def loss_fn(ps):
        return flatten(ps) @ g

    def kl_fn(ps):
        x = flatten(ps)
        return 0.5 * x @ a @ x

    res = trpo_step(loss_fn, kl_fn, theta0, max_kl=0.01, hvp=hvp)
    assert res.accepted and res.backtracks == 0
    step = flatten(res.params)
    expected = -torch.linalg.solve(a, g)
    expected = expected * math.sqrt(2 * 0.01 / float(expected @ a @ expected))
    torch.testing.assert_close(step, expected, rtol=1e-4, atol=1e-8)
    assert res.kl_after == pytest.approx(0.01, rel=1e-3) and res.kl_after <= 0.01
    assert res.loss_after < res.loss_before
    # a truncated solve: the step scale is still sqrt(2 max_kl / s^T (A + damping) s)
    res = trpo_step(loss_fn, kl_fn, theta0, max_kl=0.01, hvp=hvp, cg_iters=2, damping=1e-3)
    s = conjugate_gradient(lambda v: a @ v + 1e-3 * v, g, iters=2)
    shs = float(s @ (a @ s + 1e-3 * s))
    assert res.step_scale == pytest.approx(math.sqrt(2 * 0.01 / (shs + 1e-8)), rel=1e-4)


def test_trpo_step_improves_a_policy_surrogate() -> None:
    """A real surrogate: importance-weighted advantage of a Gaussian policy."""
    from metagrad.rl.policy import diag_gaussian_log_prob

    policy, _, _ = _policy_kl_problem()
    names = [n for n, _ in policy.named_parameters()]
    params = [p.detach() for p in policy.parameters()]
    gen = torch.Generator().manual_seed(4)
    obs = torch.randn(64, 3, generator=gen, dtype=D)
    with torch.no_grad():
        old_mean, old_log_std = policy(obs)
        actions = old_mean + old_log_std.exp() * torch.randn(64, 2, generator=gen, dtype=D)
        old_logp = diag_gaussian_log_prob(actions, old_mean, old_log_std)
    adv = torch.randn(64, generator=gen, dtype=D)

    def out(ps):
        return functional_call(policy, dict(zip(names, ps, strict=True)), (obs,))

    def loss_fn(ps):
        mean, log_std = out(ps)
        ratio = torch.exp(diag_gaussian_log_prob(actions, mean, log_std) - old_logp)
        return -(ratio * adv).mean()

    def kl_fn(ps):
        mean, log_std = out(ps)
        return diag_gaussian_kl(old_mean, old_log_std, mean, log_std).mean()

    for hvp in ("exact", "finite_difference"):
        res = trpo_step(loss_fn, kl_fn, params, max_kl=0.01, hvp=hvp)
        assert res.accepted
        assert res.loss_after < res.loss_before and 0 < res.kl_after <= 0.01
