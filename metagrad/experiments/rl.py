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

Evaluation follows the original test scripts (cbfinn/maml_rl ``maml_examples/test_maml_*.py``):
``eval_tasks`` (40) test tasks from ``eval_seed``; for each, ``eval_env_steps`` env steps of
paths (4,000; 8,000 for ant direction) before and after each of ``eval_steps`` (3)
policy-gradient steps, fresh paths of the current adapted policy for every step, step sizes
``lr, f lr, f lr, ...`` (``f = eval_later_factor``: 0.5; ant direction 0.01). Each method has
its own ``lr``: MAML its ``inner_lr``; the oracle 0 (it sees the task; the original did not
adapt it); the pretrained policy ``pretrain_eval_lr`` and the
random baseline ``random_eval_lr``, each, when 0 (the default), tuned on ``tune_tasks``
validation tasks (from ``val_seed``, never the test tasks) over ``eval_lr_grid`` by the
return after one step (the sweep is in ``eval.json``). The random baseline (a ``maml`` run's
"random" row, ``eval_random``) is a freshly initialised policy per test task, as the
original built one per goal. The table holds the average undiscounted return per path after
0..3 steps (mean and 95% CI over tasks); ``eval.json`` adds the paired per-task differences
between step counts. The pretrained baseline is its own run: ``metagrad eval MAMLDIR
PRETRAINDIR``.

Best checkpoint: every ``val_every`` iterations the policy is evaluated on ``val_tasks``
validation tasks (``val_seed``) with ``rollouts`` paths, by the return after one step (MAML)
or before adaptation (pretrain, oracle); ``best.pt`` keeps the best, and evaluation uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
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
    # the KL Hessian-vector products: fisher (J^T M J through the inner step: the KL
    # Hessian at the old policy, where TRPO takes it, without third derivatives), exact
    # (double backward through the inner step) or finite_difference (rllab's)
    "hvp": "fisher",
    "num_workers": 0,  # sampler worker processes (0: in process)
    "on_nonfinite": "stop",  # a NaN/inf meta-loss or meta-gradient: stop | skip the step
    "threads": 0,  # torch threads for the TRPO step (rollouts use 1); 0: all cores
    "log_every": 1,
    "checkpoint_every": 10,
    "time_limit_min": 0.0,
    "val_every": 25,
    "val_tasks": 20,
    "val_seed": 20_170_003,
    "eval_tasks": 40,
    "eval_env_steps": 4000,
    "eval_steps": 3,
    "eval_later_factor": 0.5,
    "pretrain_eval_lr": 0.0,
    "random_eval_lr": 0.0,
    "eval_lr_grid": [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0],
    "tune_tasks": 20,
    "eval_seed": 20_170_002,
    "eval_random": True,
}

_LOCOMOTION = {"meta_batch": 40, "rollouts": 20, "horizon": 200, "inner_lr": 0.1}

#: name -> (description, defaults). 2D navigation: the code behind the paper's curve
#: (maml_trpo_point.py, test_maml_point.py) trained and tested with alpha = 0.5, later test
#: steps 0.25 (the paper's text says 0.1: --set inner_lr=0.1); ant direction tested with
#: 8,000 env steps per step and later steps at 0.01 alpha (test_maml_ant_direc.py)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "rl-nav2d": (
        "2D navigation, MAML-TRPO, 20 tasks x 20 paths, horizon 100, alpha=0.5 (paper 5.3)",
        DEFAULTS | {"inner_lr": 0.5},
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
        DEFAULTS
        | _LOCOMOTION
        | {"env": "metagrad/AntDir-v0", "eval_env_steps": 8000, "eval_later_factor": 0.01},
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
    """What :meth:`RLExperiment.sample` draws: the seed of one meta-iteration, and (several
    processes) this process's ``part`` of its tasks and the sum over the processes."""

    seed: int
    tasks: int  # the meta-batch size
    part: tuple[int, int] | None = None  # this process's tasks [lo, hi); None: all
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None  # rows summed over processes

    def shard(self, world: Any) -> tuple[RLBatch, float]:
        """This process's part of the meta-batch and its share (``World.shard`` calls it)."""
        from .distributed import shard_bounds

        if world.size == 1:
            return self, 1.0
        lo, hi = shard_bounds(self.tasks, world.rank, world.size)
        return replace(self, part=(lo, hi), reduce=world.sum_rows), (hi - lo) / self.tasks


def _check(cfg: dict[str, Any]) -> None:
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"bad value {cfg[key]!r} for {key}: {why}")

    if cfg["env"] not in ENVS:
        raise ConfigError(f"unknown env {cfg['env']!r}; choose one of: {', '.join(ENVS)}")
    if cfg["hvp"] not in ("exact", "finite_difference", "fisher"):
        raise bad("hvp", "choose exact, finite_difference or fisher")
    positive_ints = ["rollouts", "horizon", "cg_iters", "max_backtracks", "eval_tasks"]
    positive_ints += ["eval_env_steps", "log_every", "checkpoint_every", "val_tasks", "tune_tasks"]
    for key in positive_ints:
        if cfg[key] < 1:
            raise bad(key, "must be >= 1")
    keys = ["num_workers", "eval_steps", "time_limit_min", "cg_damping", "val_every"]
    for key in (*keys, "eval_later_factor", "pretrain_eval_lr", "random_eval_lr"):
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
    if not cfg["eval_lr_grid"] or any(not lr > 0 for lr in cfg["eval_lr_grid"]):
        raise bad("eval_lr_grid", "needs one or more step sizes > 0")


class RLExperiment(Experiment):
    """MAML-TRPO, pretrained and oracle policies on the meta-RL task distributions."""

    train_metrics = ("return_pre", "return_post", "kl", "improvement", "accepted")
    val_metrics = ("val_return",)
    select_metric = "val_return"
    methods = ("maml", "pretrain", "oracle")
    #: --nproc: each process samples and adapts its share of the tasks, and the TRPO step
    #: reduces its gradient, Hessian-vector products and line-search scores over them
    data_parallel = True

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
        return RLBatch(seed, self.cfg["meta_batch"])

    def train_step(self, maml: MAML, batch: RLBatch) -> dict[str, float]:  # type: ignore[override]
        seq = np.random.SeedSequence(batch.seed)
        task_seed, sample_seed = seq.spawn(2)
        sampler = self.sampler
        tasks = sampler.sample_tasks(self.cfg["meta_batch"], np.random.default_rng(task_seed))
        sampler.seed(sample_seed)
        return self.algorithm().step(
            maml.model, sampler, tasks, self.cfg["rollouts"], shard=batch.part,
            reduce=batch.reduce,
        )  # fmt: skip

    def finalize(self, maml: MAML) -> dict[str, Any]:
        if self._sampler is not None:
            self._sampler.close()
            self._sampler = None
        return {}

    # -------------------------------------------------------------- evaluation
    def eval_lrs(self, lr: float) -> list[float]:
        """Step sizes of the test protocol: ``lr``, then ``eval_later_factor * lr``."""
        later = lr * self.cfg["eval_later_factor"]
        return [lr if j == 0 else later for j in range(self.cfg["eval_steps"])]

    @property
    def eval_rollouts(self) -> int:
        """Paths per test task and step: the original's budget of env steps per step."""
        return max(1, self.cfg["eval_env_steps"] // self.cfg["horizon"])

    def tasks_from(self, seed: int, n: int) -> list[dict[str, Any]]:
        return self.probe.sample_tasks(n, np.random.default_rng(seed))

    def eval_tasks(self) -> list[dict[str, Any]]:
        return self.tasks_from(self.cfg["eval_seed"], self.cfg["eval_tasks"])

    def adaptation_returns(
        self, policy: torch.nn.Module, lrs: list[float], tasks: list[dict[str, Any]],
        rollouts: int, seed: int, initial: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """``[tasks, len(lrs) + 1]`` average returns of the test protocol."""
        sampler = self.make_sampler(seed=seed)
        try:
            return self.algorithm().adaptation_returns(
                policy, sampler, tasks, rollouts, lrs, initial=initial
            )
        finally:
            sampler.close()

    def random_policies(self, tasks: int, seed: int) -> dict[str, torch.Tensor]:
        """A freshly initialised policy per task, stacked ``{name: [tasks, ...]}``."""
        params: list[dict[str, torch.Tensor]] = []
        with torch.random.fork_rng():
            for i in range(tasks):
                torch.manual_seed(seed + i)
                params.append({n: p.detach() for n, p in self.build().model.named_parameters()})
        return {n: torch.stack([p[n] for p in params]) for n in params[0]}

    def validate(self, maml: MAML) -> dict[str, float]:
        cfg = self.cfg
        tasks = self.tasks_from(cfg["val_seed"], cfg["val_tasks"])
        steps = 1 if cfg["method"] == "maml" else 0
        lrs = [cfg["inner_lr"]] * steps
        curve = self.adaptation_returns(
            maml.model, lrs, tasks, cfg["rollouts"], cfg["val_seed"] + 1
        )
        return {"val_return": curve[:, -1].mean().item()}

    def tune_lr(self, policy: torch.nn.Module, random: bool) -> dict[str, Any]:
        """The step size of ``eval_lr_grid`` with the best mean return after one step on
        ``tune_tasks`` validation tasks (``val_seed``; the test tasks are never seen)."""
        cfg = self.cfg
        tasks = self.tasks_from(cfg["val_seed"], cfg["tune_tasks"])
        initial = self.random_policies(len(tasks), cfg["val_seed"] + 2) if random else None
        sweep = {}
        for lr in cfg["eval_lr_grid"]:
            curve = self.adaptation_returns(
                policy, [lr], tasks, self.eval_rollouts, cfg["val_seed"] + 3, initial
            )
            sweep[lr] = curve[:, 1].mean().item()
        best = max(sweep, key=lambda lr: sweep[lr])
        return {"lr": best, "tasks": len(tasks), "return_after_1_step": sweep}

    def _row(self, policy: torch.nn.Module, lr: float, random: bool) -> dict[str, Any]:
        cfg = self.cfg
        tasks = self.eval_tasks()
        initial = self.random_policies(len(tasks), cfg["eval_seed"] + 2) if random else None
        lrs = self.eval_lrs(lr)
        curves = self.adaptation_returns(
            policy, lrs, tasks, self.eval_rollouts, cfg["eval_seed"] + 1, initial
        )
        mean, ci = mean_ci95(curves)
        # paired per task: the gain of k steps over 0 and over k - 1 (tighter than the
        # difference of the unpaired means, the tasks being the same)
        paired = {}
        if curves.shape[1] > 1:
            for name, base in (("vs_0_steps", curves[:, :1]), ("vs_previous", curves[:, :-1])):
                m, c = mean_ci95(curves[:, 1:] - base)
                paired[name] = {"mean": m, "ci95": c}
        return {"return": mean, "ci95": ci, "step_sizes": lrs, "paired": paired}

    def evaluate(self, maml: MAML) -> dict[str, Any]:
        cfg = self.cfg
        tuning = {}
        lr = maml.inner_lr  # MAML: the run's own step size
        if cfg["method"] == "oracle":  # it sees the task: the original did not adapt it (0)
            lr = 0.0
        if cfg["method"] == "pretrain":
            lr = cfg["pretrain_eval_lr"]
            if not lr:
                tuning["trained"] = self.tune_lr(maml.model, random=False)
                lr = tuning["trained"]["lr"]
        results = {"trained": self._row(maml.model, lr, random=False)}
        if cfg["eval_random"] and cfg["method"] == "maml":
            rlr = cfg["random_eval_lr"]
            if not rlr:
                tuning["random"] = self.tune_lr(maml.model, random=True)
                rlr = tuning["random"]["lr"]
            results["random"] = self._row(maml.model, rlr, random=True)
        method = cfg["method"] + ("-fo" if cfg["first_order"] and cfg["method"] == "maml" else "")
        return {
            "experiment": "rl",
            "preset": cfg.get("preset"),
            "env": cfg["env"],
            "method": method,
            "metric": "return",
            "lower_is_better": False,
            "tasks": cfg["eval_tasks"],
            "rollouts": self.eval_rollouts,
            "env_steps_per_step": self.eval_rollouts * cfg["horizon"],
            "inner_lr": maml.inner_lr,
            "step_sizes": results["trained"]["step_sizes"],
            "steps": list(range(cfg["eval_steps"] + 1)),
            "results": results,
            "tuning": tuning,
        }

    # -------------------------------------------------------------- figures
    def plot(self, run: Run, baseline: Run | None = None) -> list[Path]:
        from . import rl_plots

        return rl_plots.plot(self, run, baseline)
