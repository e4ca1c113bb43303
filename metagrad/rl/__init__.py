"""Building blocks of meta-RL (MAML section 5.3): task environments, a Gaussian MLP
policy, rllab's linear feature baseline, returns/GAE, a vectorised sampler and the TRPO
pieces (conjugate gradient, KL Hessian-vector products, backtracking line search).

Importing this package registers the ``metagrad/...`` gymnasium IDs (see
:mod:`metagrad.rl.envs`) when gymnasium and mujoco are installed (the ``rl`` extra);
the policy, baseline, returns and TRPO modules need only torch.
"""

from __future__ import annotations

from .baseline import LinearFeatureBaseline, baseline_features
from .policy import (
    FunctionalPolicy,
    GaussianMLPPolicy,
    TaskBatchedPolicy,
    diag_gaussian_entropy,
    diag_gaussian_kl,
    diag_gaussian_log_prob,
)
from .returns import discounted_returns, gae_advantages, normalize_advantages
from .trpo import (
    LineSearchResult,
    TRPOStepResult,
    conjugate_gradient,
    flatten,
    hvp_exact,
    hvp_finite_difference,
    line_search,
    trpo_step,
    unflatten,
)

__all__ = [
    "FunctionalPolicy",
    "GaussianMLPPolicy",
    "LineSearchResult",
    "LinearFeatureBaseline",
    "TRPOStepResult",
    "TaskBatchedPolicy",
    "baseline_features",
    "conjugate_gradient",
    "diag_gaussian_entropy",
    "diag_gaussian_kl",
    "diag_gaussian_log_prob",
    "discounted_returns",
    "flatten",
    "gae_advantages",
    "hvp_exact",
    "hvp_finite_difference",
    "line_search",
    "normalize_advantages",
    "trpo_step",
    "unflatten",
]

try:
    from .envs import ENV_SPECS, register_envs
    from .sampler import PolicyList, Trajectories, VectorSampler
except ModuleNotFoundError as exc:  # the ``rl`` extra (gymnasium, mujoco) is not installed
    if exc.name not in ("gymnasium", "mujoco"):
        raise
else:
    register_envs()
    __all__ += ["ENV_SPECS", "PolicyList", "Trajectories", "VectorSampler", "register_envs"]
