"""rllab's linear feature baseline, vectorised over padded paths and fit per task.

Features of the step ``t`` of a path (``t`` counted from 0 within the path)::

    [clip(o, -10, 10), clip(o, -10, 10)^2, t/100, (t/100)^2, (t/100)^3, 1]

The coefficients minimise ``||X w - R||^2 + reg ||w||^2`` over the valid (mask = 1)
steps of one task's paths, ``R`` being the discounted returns, by solving the normal
equations ``(X^T X + reg I) w = X^T R`` in float64 by Cholesky (rllab used
``np.linalg.lstsq`` on the same system). As in rllab, ``reg`` starts at ``1e-5`` and is
multiplied by 10 when the solve fails or gives non-finite coefficients, up to 5 tries;
the ridge term is applied to every coefficient, the bias included.

In MAML each task has its own baseline, fit on the same paths it is then evaluated on
(maml_rl fits before predicting; rllab's single-task TRPO predicted with the previous
iteration's fit). Inputs are ``obs [paths, T, obs_dim]``, ``returns [paths, T]``,
``mask [paths, T]`` and an optional ``task_index [paths]``; without it all paths form
one task.
"""

from __future__ import annotations

import torch
from torch import Tensor


def baseline_features(obs: Tensor, clip: float = 10.0) -> Tensor:
    """Features ``[..., T, 2 * obs_dim + 4]`` of ``obs [..., T, obs_dim]``."""
    o = obs.clamp(-clip, clip)
    t = torch.arange(obs.shape[-2], dtype=obs.dtype, device=obs.device) / 100.0
    t = t.reshape(-1, 1).expand(*obs.shape[:-1], 1)
    return torch.cat([o, o * o, t, t * t, t * t * t, torch.ones_like(t)], dim=-1)


def _group_index(task_index: Tensor | None, paths: int) -> tuple[Tensor, int]:
    if task_index is None:
        return torch.zeros(paths, dtype=torch.long), 1
    task_index = task_index.long()
    return task_index, int(task_index.max().item()) + 1 if paths else 0


def solve_ridge(xtx: Tensor, xty: Tensor, reg_coeff: float = 1e-5, max_tries: int = 5) -> Tensor:
    """Solve ``(xtx + reg I) w = xty`` batched over the leading dimension.

    ``xtx`` is a Gram matrix, so the system is symmetric positive (semi)definite and is
    solved by Cholesky. Systems whose factorisation fails (not positive definite) or
    whose solution is not finite are retried with ``reg * 10``, at most ``max_tries``
    times in all; a system still failing after that gives NaN coefficients.

    (Cholesky also sidesteps a torch 2.13 CPU bug: batched LU, i.e.
    ``torch.linalg.solve`` on ``[B, n, n]`` with ``n`` >= ~200 and more than one
    intra-op thread, fails with "Pivots given to lu_solve must all be greater or equal
    to 1" after MKL DLASWP errors; Ant's 214 features hit it.)
    """
    eye = torch.eye(xtx.shape[-1], dtype=xtx.dtype, device=xtx.device)
    coeffs = torch.full_like(xty, float("nan"))
    todo = torch.ones(xtx.shape[0], dtype=torch.bool, device=xtx.device)
    reg = reg_coeff
    for _ in range(max_tries):
        chol, info = torch.linalg.cholesky_ex(xtx[todo] + reg * eye)
        sol = torch.cholesky_solve(xty[todo].unsqueeze(-1), chol).squeeze(-1)
        ok = (info == 0) & torch.isfinite(sol).all(-1)
        idx = todo.nonzero().squeeze(-1)
        coeffs[idx[ok]] = sol[ok]
        todo[idx[ok]] = False
        if not todo.any():
            break
        reg *= 10.0
    return coeffs


class LinearFeatureBaseline:
    """Per-task linear value baseline (rllab's ``LinearFeatureBaseline``).

    ``fit`` stores ``coeffs [tasks, features]``; ``predict`` evaluates them on paths
    of those tasks (zero at padded steps).
    """

    def __init__(self, reg_coeff: float = 1e-5, max_tries: int = 5) -> None:
        self.reg_coeff = reg_coeff
        self.max_tries = max_tries
        self.coeffs: Tensor | None = None

    def fit(
        self, obs: Tensor, returns: Tensor, mask: Tensor, task_index: Tensor | None = None
    ) -> Tensor:
        """Fit one coefficient vector per task; returns ``coeffs [tasks, features]``."""
        feats = baseline_features(obs.detach().double())
        m = mask.detach().double().unsqueeze(-1)
        x = (feats * m).flatten(0, 1)  # [paths * T, F]
        y = (returns.detach().double() * mask.detach().double()).flatten()
        group, n_groups = _group_index(task_index, obs.shape[0])
        row_group = group.repeat_interleave(obs.shape[1])
        f = x.shape[-1]
        xtx = x.new_zeros(n_groups, f, f)
        xty = x.new_zeros(n_groups, f)
        for g in range(n_groups):
            rows = row_group == g
            xg = x[rows]
            xtx[g] = xg.T @ xg
            xty[g] = xg.T @ y[rows]
        self.coeffs = solve_ridge(xtx, xty, self.reg_coeff, self.max_tries)
        return self.coeffs

    def predict(self, obs: Tensor, mask: Tensor, task_index: Tensor | None = None) -> Tensor:
        """Baseline values ``[paths, T]`` (in ``obs``'s dtype), zero where ``mask`` is 0."""
        if self.coeffs is None:
            raise RuntimeError("fit the baseline before predicting")
        group, _ = _group_index(task_index, obs.shape[0])
        feats = baseline_features(obs.detach().double())
        values = torch.einsum("ptf,pf->pt", feats, self.coeffs[group])
        return (values * mask.double()).to(obs.dtype)

    def fit_predict(
        self, obs: Tensor, returns: Tensor, mask: Tensor, task_index: Tensor | None = None
    ) -> Tensor:
        """:meth:`fit` then :meth:`predict` on the same paths (what MAML does per task)."""
        self.fit(obs, returns, mask, task_index)
        return self.predict(obs, mask, task_index)
