"""Linear feature baseline, discounted returns, GAE and advantage normalisation."""

from __future__ import annotations

import numpy as np
import torch

from metagrad.rl.baseline import LinearFeatureBaseline, baseline_features, solve_ridge
from metagrad.rl.returns import discounted_returns, gae_advantages, normalize_advantages

D = torch.float64


def _mask(lengths: list[int], horizon: int) -> torch.Tensor:
    return (torch.arange(horizon)[None] < torch.tensor(lengths)[:, None]).to(D)


def test_features_match_rllab_definition() -> None:
    obs = torch.tensor([[[0.5, -20.0], [3.0, 11.0], [-1.0, 0.0]]], dtype=D)
    f = baseline_features(obs)
    assert f.shape == (1, 3, 8)
    o = np.clip(obs[0].numpy(), -10, 10)
    t = np.arange(3).reshape(-1, 1) / 100.0
    expected = np.concatenate([o, o**2, t, t**2, t**3, np.ones((3, 1))], axis=1)
    np.testing.assert_allclose(f[0].numpy(), expected)


def test_linear_baseline_recovers_per_task_coefficients() -> None:
    g = torch.Generator().manual_seed(0)
    paths, horizon, obs_dim, tasks = 12, 200, 3, 3
    obs = 2 * torch.rand(paths, horizon, obs_dim, generator=g, dtype=D) - 1
    lengths = [200, 117, 200, 35, 200, 200, 152, 200, 90, 200, 200, 200]
    mask = _mask(lengths, horizon)
    task_index = torch.tensor([0, 1, 2] * 4)  # interleaved, not contiguous
    true_w = torch.randn(tasks, 2 * obs_dim + 4, generator=g, dtype=D)
    feats = baseline_features(obs)
    returns = torch.einsum("ptf,pf->pt", feats, true_w[task_index])
    # Garbage on padded steps must not matter.
    obs_padded = torch.where(mask[..., None] > 0, obs, torch.full_like(obs, 7.0))
    returns_padded = torch.where(mask > 0, returns, torch.full_like(returns, 1e3))
    bl = LinearFeatureBaseline()
    coeffs = bl.fit(obs_padded, returns_padded, mask, task_index)
    torch.testing.assert_close(coeffs, true_w, rtol=0, atol=2e-3)
    values = bl.predict(obs_padded, mask, task_index)
    torch.testing.assert_close(values, returns * mask, rtol=0, atol=1e-4)
    assert torch.all(values[mask == 0] == 0)
    # One task when no index is given: fits the pooled data.
    pooled = LinearFeatureBaseline().fit(obs, returns, mask)
    assert pooled.shape == (1, 2 * obs_dim + 4)
    # float32 observations give float32 values.
    v32 = bl.predict(obs.float(), mask.float(), task_index)
    assert v32.dtype == torch.float32


def test_ridge_solve_retries_with_larger_regulariser() -> None:
    eye = torch.eye(3, dtype=D)
    xtx = torch.stack([2 * eye, -1e-5 * eye])  # second is singular at reg = 1e-5
    xty = torch.ones(2, 3, dtype=D)
    w = solve_ridge(xtx, xty, reg_coeff=1e-5)
    torch.testing.assert_close(w[0], xty[0] / (2 + 1e-5))
    torch.testing.assert_close(w[1], xty[1] / (1e-4 - 1e-5))
    never = solve_ridge(torch.full((1, 3, 3), float("nan"), dtype=D), xty[:1], max_tries=3)
    assert torch.isnan(never).all()


def _loop_returns(rewards: list[float], gamma: float) -> list[float]:
    out, running = [], 0.0
    for r in reversed(rewards):
        running = r + gamma * running
        out.append(running)
    return out[::-1]


def _loop_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    v = values + [0.0]
    deltas = [rewards[t] + gamma * v[t + 1] - v[t] for t in range(len(rewards))]
    return _loop_returns(deltas, gamma * lam)


def test_returns_and_gae_against_loops_with_masks() -> None:
    g = torch.Generator().manual_seed(1)
    horizon, lengths = 6, [6, 3, 1, 4]
    mask = _mask(lengths, horizon)
    rewards = torch.randn(4, horizon, generator=g, dtype=D)
    values = torch.randn(4, horizon, generator=g, dtype=D)
    gamma, lam = 0.9, 0.8
    ret = discounted_returns(rewards, mask, gamma)
    adv = gae_advantages(rewards, values, mask, gamma, lam)
    adv1 = gae_advantages(rewards, values, mask, gamma)
    for p, n in enumerate(lengths):
        r, v = rewards[p, :n].tolist(), values[p, :n].tolist()
        np.testing.assert_allclose(ret[p, :n].numpy(), _loop_returns(r, gamma))
        np.testing.assert_allclose(adv[p, :n].numpy(), _loop_gae(r, v, gamma, lam))
        assert torch.all(ret[p, n:] == 0) and torch.all(adv[p, n:] == 0)
    torch.testing.assert_close(adv1, (ret - values) * mask)  # lam = 1
    # Bootstrapping a truncated path with a value after its last step.
    last = torch.tensor([2.0, -1.0, 0.5, 0.0], dtype=D)
    boot = gae_advantages(rewards, values, mask, gamma, lam, last_values=last)
    for p, n in enumerate(lengths):
        r, v = rewards[p, :n].tolist(), values[p, :n].tolist()
        v_ext = v + [float(last[p])]
        deltas = [r[t] + gamma * v_ext[t + 1] - v_ext[t] for t in range(n)]
        np.testing.assert_allclose(boot[p, :n].numpy(), _loop_returns(deltas, gamma * lam))
    # Defaults: gamma 0.99.
    torch.testing.assert_close(
        discounted_returns(rewards, mask), discounted_returns(rewards, mask, 0.99)
    )


def test_normalize_advantages_per_task() -> None:
    g = torch.Generator().manual_seed(2)
    horizon, lengths = 5, [5, 2, 4, 5, 1, 3]
    mask = _mask(lengths, horizon)
    adv = 3 * torch.randn(6, horizon, generator=g, dtype=D) + 1
    task_index = torch.tensor([0, 0, 1, 1, 2, 2])
    out = normalize_advantages(adv, mask, task_index)
    for k in range(3):
        rows = (task_index == k).nonzero().squeeze(-1).tolist()
        vals = np.concatenate([adv[p, : lengths[p]].numpy() for p in rows])
        expected = (vals - vals.mean()) / (vals.std() + 1e-8)
        got = np.concatenate([out[p, : lengths[p]].numpy() for p in rows])
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    assert torch.all(out[mask == 0] == 0)
    centred = normalize_advantages(adv, mask, task_index, scale=False)
    pooled = normalize_advantages(adv, mask)
    valid = adv[mask > 0].numpy()
    np.testing.assert_allclose(
        pooled[mask > 0].numpy(), (valid - valid.mean()) / (valid.std() + 1e-8), rtol=1e-10
    )
    assert abs(float((centred * mask)[task_index == 0].sum())) < 1e-10


def test_baseline_fit_with_ant_sized_features_and_two_threads() -> None:
    """Regression: batched LU solves of >= ~200 unknowns fail on torch 2.13 CPU with
    more than one thread; the Cholesky path must not."""
    g = torch.Generator().manual_seed(3)
    obs = torch.randn(8, 200, 105, generator=g)  # Ant-v5: 2 * 105 + 4 = 214 features
    obs[..., 40:60] = 0.0  # never-touching bodies: constant zero contact features
    returns = torch.randn(8, 200, generator=g)
    mask = torch.ones(8, 200)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        bl = LinearFeatureBaseline()
        coeffs = bl.fit(obs, returns, mask, torch.arange(8) // 2)
    finally:
        torch.set_num_threads(before)
    assert coeffs.shape == (4, 214) and torch.isfinite(coeffs).all()
    assert torch.isfinite(bl.predict(obs, mask, torch.arange(8) // 2)).all()
