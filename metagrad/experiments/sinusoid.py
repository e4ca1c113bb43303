"""Sinusoid regression (MAML paper, section 5.1, Figures 2 and 3).

``method = "maml"`` meta-trains the 1-40-40-1 ReLU MLP; ``method = "pretrain"`` trains the
same network by plain regression on points of random tasks (the paper's "pretrained"
baseline) and then picks its test-time fine-tuning step size on validation tasks (never
the test tasks) from a grid, as the paper tunes it.

``method = "oracle"`` is the original code's oracle baseline (cbfinn/maml,
``--baseline=oracle``): a 3-40-40-1 network that sees each point as ``[x, amplitude,
phase]`` (:meth:`SinusoidExperiment.inputs`; raw values, unnormalized, as there), trained
exactly like ``pretrain`` (Adam, ``meta_lr``, ``iterations``, ``meta_batch`` tasks,
regression on all support and query points). It knows the task, so it needs no adaptation;
it is still evaluated under the same protocol (gradient steps on the K support points,
whose inputs carry the amplitude and phase too), with its fine-tuning step size picked from
``finetune_lrs`` on validation tasks as for ``pretrain``, for consistency. A loaded oracle
model (``metagrad.load_run``) expects those 3-column inputs.

Evaluation: 600 test tasks drawn from a fixed seed (``eval_seed``, independent of the
training seed), the same tasks and query points for every K; the MSE on
``eval_queries`` query points after 0..``eval_steps`` gradient steps on K support points,
mean and 95% confidence interval over tasks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from ..core import MAML
from ..models import MLP
from ..tasks import SinusoidBatch, SinusoidTasks
from .base import Batch, Experiment
from .options import FAMILY, OUTER, algorithm_label, build_learner, compile_option, vectorize_option
from .runs import Run
from .stats import summarize_curves

DEFAULTS: dict[str, Any] = (
    {
        "experiment": "sinusoid",
        "method": "maml",
        "seed": 0,
        "iterations": 70_000,
        "meta_batch": 25,
        "shots": 10,
        "queries": 10,
        "hidden": [40, 40],
        "inner_lr": 0.01,
        "inner_steps": 1,
        "first_order": False,
        "meta_lr": 1e-3,
        "vectorize": "auto",
        "compile": "false",  # torch.compile the meta-gradient: true, false or auto (on CUDA)
        "on_nonfinite": "stop",  # a NaN/inf meta-loss or meta-gradient: stop | skip the step
        "threads": 1,  # torch threads; a tiny MLP runs fastest on one (0: torch's default)
        "log_every": 100,
        "checkpoint_every": 2000,
        "time_limit_min": 0.0,  # stop after this many minutes of training (0: no limit)
        "eval_tasks": 600,
        "eval_shots": [5, 10, 20],
        "eval_steps": 10,
        "eval_queries": 100,
        "eval_seed": 20_170_000,
        "finetune_lrs": [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2],
        "finetune_val_tasks": 200,
    }
    | FAMILY
    | OUTER
)

#: name -> (description, defaults)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "sinusoid": (
        "sinusoid regression, MLP 1-40-40-1, K=10, 1 step alpha=0.01, 70k its (paper 5.1)",
        DEFAULTS,
    ),
}


def _mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred, target)


class SinusoidExperiment(Experiment):
    methods = ("maml", "pretrain", "oracle")

    def __init__(self, cfg, device) -> None:
        super().__init__(cfg, device)
        self.tasks = SinusoidTasks()
        self.vectorize = vectorize_option(cfg["vectorize"])

    def build(self) -> MAML:
        cfg = self.cfg
        model = MLP(3 if cfg["method"] == "oracle" else 1, cfg["hidden"], 1)
        return build_learner(
            model, _mse, cfg, vectorize=self.vectorize, compile=compile_option(cfg["compile"])
        )

    def inputs(self, x: torch.Tensor, amplitude: torch.Tensor, phase: torch.Tensor):
        """What the network sees of points ``x`` (``[tasks, points, 1]``) of the tasks with
        these amplitudes and phases: ``x`` itself, or ``[x, A, phi]`` per point for the oracle."""
        if self.cfg["method"] != "oracle":
            return x
        return self.tasks.task_inputs(x, amplitude, phase)

    def _tensors(self, batch: SinusoidBatch) -> Batch:
        sx, sy, qx, qy = batch.tensors()
        a, p = batch.amplitude, batch.phase
        return self.inputs(sx, a, p), sy, self.inputs(qx, a, p), qy

    def sample(self, generator: torch.Generator) -> Batch:
        cfg = self.cfg
        batch = self.tasks.sample(cfg["meta_batch"], cfg["shots"], cfg["queries"], generator)
        return tuple(t.to(self.device) for t in self._tensors(batch))  # type: ignore[return-value]

    def train_step(self, maml: MAML, batch: Batch) -> dict[str, float]:
        if self.cfg["method"] == "maml":
            return super().train_step(maml, batch)
        sx, sy, qx, qy = batch  # pretrain, oracle: plain regression on all points of all tasks
        loss = _mse(maml.model(torch.cat([sx, qx], 1)), torch.cat([sy, qy], 1))
        loss.backward()
        return {"loss": loss.item()}

    # -------------------------------------------------------------- evaluation
    def _eval_batch(self, tasks: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        shots = max(self.cfg["eval_shots"])
        return self.tasks.sample(tasks, shots, self.cfg["eval_queries"], g)

    def _curves(self, maml: MAML, batch, shots: int, lr: float, steps: int) -> torch.Tensor:
        sx, sy, qx, qy = (t.to(self.device) for t in self._tensors(batch))
        out = maml.adaptation_curve(
            sx[:, :shots], sy[:, :shots], qx, qy, steps, {"mse": _mse}, lr=lr
        )
        return out["mse"].cpu()

    def finalize(self, maml: MAML) -> dict[str, Any]:
        if self.cfg["method"] == "maml":
            return {}
        # tune the fine-tuning step size on validation tasks (a seed apart from the test ones)
        batch = self._eval_batch(self.cfg["finetune_val_tasks"], self.cfg["eval_seed"] + 1)
        steps, shots = self.cfg["eval_steps"], self.cfg["shots"]
        scores = {
            lr: self._curves(maml, batch, shots, lr, steps)[:, 1:].mean().item()
            for lr in self.cfg["finetune_lrs"]
        }
        finite = {lr: v for lr, v in scores.items() if math.isfinite(v)}
        if not finite:
            raise RuntimeError("fine-tuning diverged for every step size in finetune_lrs")
        best = min(finite, key=finite.__getitem__)
        return {"inner_lr": best, "finetune_scores": {str(k): v for k, v in scores.items()}}

    def evaluate(self, maml: MAML) -> dict[str, Any]:
        cfg = self.cfg
        batch = self._eval_batch(cfg["eval_tasks"], cfg["eval_seed"])
        results = {}
        for k in cfg["eval_shots"]:
            curves = self._curves(maml, batch, k, maml.inner_lr, cfg["eval_steps"])
            results[f"K={k}"] = summarize_curves(curves)  # reports diverged tasks too
        return {
            "experiment": "sinusoid",
            "method": cfg["method"],
            "algorithm": algorithm_label(cfg) if cfg["method"] == "maml" else cfg["method"],
            "metric": "mse",
            "lower_is_better": True,
            "tasks": cfg["eval_tasks"],
            "inner_lr": maml.inner_lr,
            "steps": list(range(cfg["eval_steps"] + 1)),
            "results": results,
        }

    # -------------------------------------------------------------- figures
    def plot(self, run: Run, baseline: Run | None = None) -> list[Path]:
        from . import sinusoid_plots

        return sinusoid_plots.plot(self, run, baseline)
