"""Gaussian MLP policy and diagonal-Gaussian formulas against torch.distributions."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence
from torch.func import functional_call, grad

from metagrad.core.functional import forward
from metagrad.rl.policy import (
    FunctionalPolicy,
    GaussianMLPPolicy,
    diag_gaussian_entropy,
    diag_gaussian_kl,
    diag_gaussian_log_prob,
    sample_actions,
)


def _dist(mean: torch.Tensor, log_std: torch.Tensor) -> Independent:
    return Independent(Normal(mean, log_std.exp().expand_as(mean)), 1)


def test_log_prob_entropy_kl_match_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    mean_p, mean_q = torch.randn(2, 7, 3, generator=g, dtype=torch.float64)
    log_std_p = 0.3 * torch.randn(3, generator=g, dtype=torch.float64)  # state-independent
    log_std_q = 0.3 * torch.randn(7, 3, generator=g, dtype=torch.float64)  # per-sample
    actions = torch.randn(7, 3, generator=g, dtype=torch.float64)
    p, q = _dist(mean_p, log_std_p), _dist(mean_q, log_std_q)
    torch.testing.assert_close(
        diag_gaussian_log_prob(actions, mean_p, log_std_p), p.log_prob(actions)
    )
    torch.testing.assert_close(
        diag_gaussian_log_prob(actions, mean_q, log_std_q), q.log_prob(actions)
    )
    torch.testing.assert_close(diag_gaussian_entropy(log_std_p, mean_p), p.entropy())
    torch.testing.assert_close(diag_gaussian_entropy(log_std_q), q.entropy())
    torch.testing.assert_close(
        diag_gaussian_kl(mean_p, log_std_p, mean_q, log_std_q), kl_divergence(p, q)
    )
    torch.testing.assert_close(
        diag_gaussian_kl(mean_q, log_std_q, mean_p, log_std_p), kl_divergence(q, p)
    )
    assert diag_gaussian_kl(mean_p, log_std_p, mean_p, log_std_p).abs().max() < 1e-12


def test_policy_shapes_init_and_functional_call() -> None:
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(5, 2)
    names = [n for n, _ in policy.named_parameters()]
    assert names == [
        "log_std", "mean_net.0.weight", "mean_net.0.bias", "mean_net.2.weight",
        "mean_net.2.bias", "mean_net.4.weight", "mean_net.4.bias",
    ]  # fmt: skip
    assert policy.mean_net[0].weight.shape == (100, 5)
    assert torch.equal(policy.log_std, torch.zeros(2))
    assert torch.equal(policy.mean_net[2].bias, torch.zeros(100))
    obs = torch.randn(4, 5)
    mean, log_std = policy(obs)
    assert mean.shape == (4, 2) and log_std.shape == (2,)

    params = {k: v.detach() + 0.1 for k, v in policy.named_parameters()}
    m1, s1 = forward(policy, params, {}, obs)
    m2, s2 = FunctionalPolicy(policy, params)(obs)
    torch.testing.assert_close(m1, m2)
    torch.testing.assert_close(s1, params["log_std"])
    assert not torch.allclose(m1, mean)

    # An inner policy-gradient step through torch.func, as MAML does.
    actions, adv = torch.randn(4, 2), torch.randn(4)

    def surrogate(p: dict[str, torch.Tensor]) -> torch.Tensor:
        mu, ls = functional_call(policy, p, (obs,))
        return -(diag_gaussian_log_prob(actions, mu, ls) * adv).mean()

    g = grad(surrogate)(params)
    assert set(g) == set(params) and all(torch.isfinite(v).all() for v in g.values())
    policy.zero_grad()
    surrogate(dict(policy.named_parameters())).backward()
    g0 = grad(surrogate)({k: v.detach() for k, v in policy.named_parameters()})
    for k, p in policy.named_parameters():
        torch.testing.assert_close(p.grad, g0[k])


def test_custom_hidden_sizes_and_sampling() -> None:
    policy = GaussianMLPPolicy(3, 4, hidden_sizes=(8,), activation=torch.nn.Tanh, init_log_std=-1.0)
    assert len([m for m in policy.mean_net if isinstance(m, torch.nn.Linear)]) == 2
    obs = torch.zeros(20000, 3)
    a = sample_actions(policy, obs, torch.Generator().manual_seed(1))
    mean, _ = policy(obs[:1])
    assert a.shape == (20000, 4)
    torch.testing.assert_close(a.mean(0), mean[0].detach(), atol=0.01, rtol=0)
    assert a.std(0).sub(torch.exp(torch.tensor(-1.0))).abs().max() < 0.01


def test_detached_functional_policy_is_picklable() -> None:
    import pickle
    from multiprocessing.reduction import ForkingPickler

    policy = GaussianMLPPolicy(2, 2, hidden_sizes=(4,))
    adapted = {k: v * 2 for k, v in policy.named_parameters()}  # non-leaf
    fp = FunctionalPolicy(policy, adapted)
    restored = pickle.loads(pickle.dumps(fp.detached()))
    obs = torch.randn(3, 2)
    torch.testing.assert_close(restored(obs)[0], fp(obs)[0].detach())
    with pytest.raises(RuntimeError):
        ForkingPickler.dumps(fp)
