"""Meta-reinforcement learning: MAML with policy gradients (MAML paper, section 5.3).

Methods (config ``method``):

* ``maml``: MAML-TRPO (:class:`metagrad.rl.maml_trpo.MAMLTRPO`): per task one (or
  ``inner_steps``) REINFORCE step with ``inner_lr`` on ``rollouts`` paths, TRPO on the
  post-update paths; ``first_order`` drops the second-order terms.
* ``pretrain``: TRPO on the task distribution (the same loop without adaptation; the
  objective is on pre-update paths of random tasks), the paper's "pretrained" baseline.
* ``oracle``: like ``pretrain``, but the policy also observes the task (goal position,
  velocity or direction appended to every observation, see
  :func:`metagrad.rl.maml_trpo.task_features`).

Integration with :func:`metagrad.experiments.training.train`: :meth:`RLExperiment.sample`
only draws a 63-bit seed from the checkpointed task generator (tasks and the sampler's
reset seeds and noise all derive from it, so a resumed run continues exactly); the
rollouts, the inner steps and the TRPO update all happen in :meth:`train_step`, which
writes the new parameters into the module itself. TRPO is not a gradient-descent
optimizer, so :meth:`optimizer` returns :class:`NoOpOptimizer`, whose ``step`` does
nothing (it only keeps the checkpoint format of the other experiments). Rollouts and
updates run on the CPU whatever ``--device`` says (small MLP, env-bound).

Evaluation (as the original code): ``eval_tasks`` (40) test tasks from ``eval_seed``; for
each, ``eval_rollouts`` (20) paths before and after each of ``eval_steps`` (3)
policy-gradient steps, step sizes ``inner_lr, inner_lr/2, inner_lr/2, ...``, fresh paths
of the current adapted policy for every step; the table holds the average undiscounted
return per path after 0..3 steps (mean and 95% CI over tasks). A ``maml`` run's
``eval.json`` also holds the "random init" row (``eval_random``): the same protocol from
the run's own initial parameters (the policy built from ``seed`` before meta-training).
The pretrained baseline is its own run: ``metagrad eval MAMLDIR PRETRAINDIR``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core import MAML
from ..errors import ConfigError
from .base import Experiment
from .runs import Run
from .stats import mean_ci95

ENVS = {
    "metagrad/Navigation2D-v0": "2D navigation",
    "metagrad/HalfCheetahVel-v0": "half-cheetah, goal velocity",
    "metagrad/HalfCheetahDir-v0": "half-cheetah, forward/backward",
    "metagrad/AntVel-v0": "ant, goal velocity",
    "metagrad/AntDir-v0": "ant, forward/backward",
}

DEFAULTS: dict[str, Any] = {
    "experiment": "rl",
    "method": "maml",
    "env": "metagrad/Navigation2D-v0",
    "seed": 0,
    "iterations": 500,
    "meta_batch": 20,
    "rollouts": 20,
    "horizon": 100,
    "hidden": [100, 100],
    "init_log_std": 0.0,
    "inner_lr": 0.1,
    "inner_steps": 1,
    "first_order": False,
    "gamma": 0.99,
    "gae_lambda": 1.0,
    "center_adv": True,  # normalise advantages per task (centre and scale, rllab's center_adv)
    "max_kl": 0.01,
    "cg_iters": 10,
    "cg_damping": 1e-5,
    "backtrack_ratio": 0.8,
    "max_backtracks": 15,
    "hvp": "exact",  # exact (double backward through the inner step) or finite_difference
    "num_workers": 0,  # sampler worker processes (0: in process)
    "on_nonfinite": "stop",  # a NaN/inf meta-loss or meta-gradient: stop | skip the step
    "threads": 1,
    "log_every": 1,
    "checkpoint_every": 10,
    "time_limit_min": 0.0,
    "eval_tasks": 40,
    "eval_rollouts": 20,
    "eval_steps": 3,
    "eval_seed": 20_170_002,
    "eval_random": True,
}

_LOCOMOTION = {"meta_batch": 40, "rollouts": 20, "horizon": 200, "inner_lr": 0.1}

#: name -> (description, defaults)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "rl-nav2d": (
        "2D navigation, MAML-TRPO, 20 tasks x 20 paths, horizon 100, alpha=0.1 (paper 5.3)",
        DEFAULTS,
    ),
    "rl-cheetah-vel": (
        "half-cheetah goal velocity, MAML-TRPO, 40 tasks x 20 paths, horizon 200, alpha=0.1",
        DEFAULTS | _LOCOMOTION | {"env": "metagrad/HalfCheetahVel-v0"},
    ),
    "rl-cheetah-dir": (
        "half-cheetah forward/backward, MAML-TRPO, 40 tasks x 20 paths, horizon 200, alpha=0.1",
        DEFAULTS | _LOCOMOTION | {"env": "metagrad/HalfCheetahDir-v0"},
    ),
    "rl-ant-vel": (
        "ant goal velocity, MAML-TRPO, 40 tasks x 20 paths, horizon 200, alpha=0.1",
        DEFAULTS | _LOCOMOTION | {"env": "metagrad/AntVel-v0"},
    ),
    "rl-ant-dir": (
        "ant forward/backward, MAML-TRPO, 40 tasks x 20 paths, horizon 200, alpha=0.1",
        DEFAULTS | _LOCOMOTION | {"env": "metagrad/AntDir-v0"},
    ),
}


class NoOpOptimizer(torch.optim.Optimizer):
    """An optimizer whose ``step`` does nothing: TRPO updates the parameters itself."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {})

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        return None


@dataclass(frozen=True)
class RLBatch:
    """What :meth:`RLExperiment.sample` draws: the seed of one meta-iteration."""

    seed: int


def _check(cfg: dict[str, Any]) -> None:
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"bad value {cfg[key]!r} for {key}: {why}")

    if cfg["env"] not in ENVS:
        raise ConfigError(f"unknown env {cfg['env']!r}; choose one of: {', '.join(ENVS)}")
    if cfg["hvp"] not in ("exact", "finite_difference"):
        raise bad("hvp", "choose exact or finite_difference")
    positive_ints = ["rollouts", "horizon", "cg_iters", "max_backtracks", "eval_tasks"]
    positive_ints += ["eval_rollouts", "log_every", "checkpoint_every"]
    for key in positive_ints:
        if cfg[key] < 1:
            raise bad(key, "must be >= 1")
    for key in ("num_workers", "eval_steps", "time_limit_min", "cg_damping"):
        if cfg[key] < 0:
            raise bad(key, "must be >= 0")
    if cfg["method"] == "maml" and cfg["inner_steps"] < 1:
        raise bad("inner_steps", "must be >= 1 for method maml")
    for key in ("inner_lr", "max_kl"):
        if not cfg[key] > 0:
            raise bad(key, "must be > 0")
    if not 0 < cfg["gamma"] <= 1:
        raise bad("gamma", "must be in (0, 1]")
    if cfg["on_nonfinite"] == "skip":  # TRPO has moved the policy before the check
        raise bad("on_nonfinite", "RL runs can only stop (TRPO updates the policy inside the step)")
    if not 0 <= cfg["gae_lambda"] <= 1:
        raise bad("gae_lambda", "must be in [0, 1]")
    if not 0 < cfg["backtrack_ratio"] < 1:
        raise bad("backtrack_ratio", "must be in (0, 1)")
    if not cfg["hidden"] or any(h < 1 for h in cfg["hidden"]):
        raise bad("hidden", "needs one or more layer sizes >= 1")


class RLExperiment(Experiment):
    """MAML-TRPO, pretrained and oracle policies on the meta-RL task distributions."""

    train_metrics = ("return_pre", "return_post", "kl", "improvement", "accepted")
    methods = ("maml", "pretrain", "oracle")
    #: the TRPO step is not a plain gradient average: --nproc is refused for meta-RL (for now)
    data_parallel = False

    def __init__(self, cfg: dict[str, Any], device: torch.device) -> None:
        super().__init__(cfg, device)
        try:
            import metagrad.rl  # noqa: F401
            from metagrad.rl import maml_trpo  # noqa: F401
        except ModuleNotFoundError as e:
            raise ConfigError(
                f"RL experiments need the 'rl' extra ({e.name} is missing): "
                "pip install 'metagrad[rl]'"
            ) from None
        _check(cfg)
        self.device = torch.device("cpu")  # rollouts and the TRPO step run on the CPU
        self._sampler: Any = None
        self._probe: Any = None

    # -------------------------------------------------------------- pieces
    @property
    def task_features(self) -> Any:
        from ..rl.maml_trpo import task_features

        return task_features if self.cfg["method"] == "oracle" else None

    def make_sampler(self, seed: int | None = None, num_workers: int = 0) -> Any:
        from ..rl import VectorSampler

        return VectorSampler(
            self.cfg["env"], max_path_length=self.cfg["horizon"], seed=seed,
            num_workers=num_workers, task_features=self.task_features,
        )  # fmt: skip

    @property
    def probe(self) -> Any:
        """A sampler without workers: dimensions and task distribution."""
        if self._probe is None:
            self._probe = self.make_sampler()
        return self._probe

    @property
    def sampler(self) -> Any:
        """The training sampler (with ``num_workers`` worker processes)."""
        if self.cfg["num_workers"] == 0:
            return self.probe
        if self._sampler is None:
            self._sampler = self.make_sampler(num_workers=self.cfg["num_workers"])
        return self._sampler

    def algorithm(self) -> Any:
        from ..rl.maml_trpo import MAMLTRPO

        cfg = self.cfg
        return MAMLTRPO(
            inner_lr=cfg["inner_lr"], inner_steps=cfg["inner_steps"],
            first_order=cfg["first_order"], adapt=cfg["method"] == "maml",
            gamma=cfg["gamma"], gae_lambda=cfg["gae_lambda"],
            normalize_advantages=cfg["center_adv"], max_kl=cfg["max_kl"],
            cg_iters=cfg["cg_iters"], cg_damping=cfg["cg_damping"],
            backtrack_ratio=cfg["backtrack_ratio"], max_backtracks=cfg["max_backtracks"],
            hvp=cfg["hvp"],
        )  # fmt: skip

    def build(self) -> MAML:
        from ..rl import GaussianMLPPolicy
        from ..rl.maml_trpo import PolicyMAML

        cfg = self.cfg
        probe = self.probe
        policy = GaussianMLPPolicy(
            probe.obs_dim, probe.act_dim, cfg["hidden"], init_log_std=cfg["init_log_std"]
        )
        return PolicyMAML(
            policy, inner_lr=cfg["inner_lr"], inner_steps=max(cfg["inner_steps"], 1),
            first_order=cfg["first_order"],
        )  # fmt: skip

    def optimizer(self, maml: MAML) -> torch.optim.Optimizer:
        return NoOpOptimizer(maml.parameters())

    # -------------------------------------------------------------- training
    def sample(self, generator: torch.Generator) -> RLBatch:  # type: ignore[override]
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
        return RLBatch(seed)

    def train_step(self, maml: MAML, batch: RLBatch) -> dict[str, float]:  # type: ignore[override]
        seq = np.random.SeedSequence(batch.seed)
        task_seed, sample_seed = seq.spawn(2)
        sampler = self.sampler
        tasks = sampler.sample_tasks(self.cfg["meta_batch"], np.random.default_rng(task_seed))
        sampler.seed(sample_seed)
        return self.algorithm().step(maml.model, sampler, tasks, self.cfg["rollouts"])

    def finalize(self, maml: MAML) -> dict[str, Any]:
        if self._sampler is not None:
            self._sampler.close()
            self._sampler = None
        return {}

    # -------------------------------------------------------------- evaluation
    def eval_lrs(self, inner_lr: float | None = None) -> list[float]:
        """Step sizes of the test protocol: ``alpha`` then ``alpha / 2`` for later steps."""
        lr = self.cfg["inner_lr"] if inner_lr is None else inner_lr
        return [lr if j == 0 else lr / 2 for j in range(self.cfg["eval_steps"])]

    def eval_tasks(self) -> list[dict[str, Any]]:
        rng = np.random.default_rng(self.cfg["eval_seed"])
        return self.probe.sample_tasks(self.cfg["eval_tasks"], rng)

    def adaptation_returns(self, policy: torch.nn.Module, inner_lr: float) -> torch.Tensor:
        """``[eval_tasks, eval_steps + 1]`` average returns of the test protocol."""
        sampler = self.make_sampler(seed=self.cfg["eval_seed"] + 1)
        try:
            return self.algorithm().adaptation_returns(
                policy, sampler, self.eval_tasks(), self.cfg["eval_rollouts"],
                self.eval_lrs(inner_lr),
            )  # fmt: skip
        finally:
            sampler.close()

    def initial_model(self) -> MAML:
        """The run's policy before meta-training (built from ``seed``, as ``train`` does)."""
        with torch.random.fork_rng():
            torch.manual_seed(self.cfg["seed"])
            return self.build()

    def evaluate(self, maml: MAML) -> dict[str, Any]:
        cfg = self.cfg
        entries = {"trained": maml}
        if cfg["eval_random"] and cfg["method"] == "maml":
            entries["random init"] = self.initial_model()
        results = {}
        for name, model in entries.items():
            mean, ci = mean_ci95(self.adaptation_returns(model.model, maml.inner_lr))
            results[name] = {"return": mean, "ci95": ci}
        method = cfg["method"] + ("-fo" if cfg["first_order"] and cfg["method"] == "maml" else "")
        return {
            "experiment": "rl",
            "preset": cfg.get("preset"),
            "env": cfg["env"],
            "method": method,
            "metric": "return",
            "lower_is_better": False,
            "tasks": cfg["eval_tasks"],
            "rollouts": cfg["eval_rollouts"],
            "inner_lr": maml.inner_lr,
            "step_sizes": self.eval_lrs(maml.inner_lr),
            "steps": list(range(cfg["eval_steps"] + 1)),
            "results": results,
        }

    # -------------------------------------------------------------- figures
    def plot(self, run: Run, baseline: Run | None = None) -> list[Path]:
        from . import rl_plots

        return rl_plots.plot(self, run, baseline)
