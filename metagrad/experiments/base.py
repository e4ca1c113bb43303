"""What every supervised experiment provides to the training loop and the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler

from ..core import MAML
from ..errors import ConfigError
from .config import Config
from .runs import BEST, CHECKPOINT, Run

Batch = tuple[Tensor, Tensor, Tensor, Tensor]

# training-loop keys with a fixed set of values
_CHOICES: dict[str, tuple[str, ...]] = {
    "meta_optimizer": ("adam", "sgd"),
    "lr_schedule": ("constant", "linear", "cosine"),
    "on_nonfinite": ("stop", "skip"),
    "tensorboard": ("auto", "true", "false"),
}


class Experiment:
    """Builds the model for a config, samples batches, and takes one meta-training step.

    Subclasses implement :meth:`build`, :meth:`sample`, :meth:`evaluate` and :meth:`plot`
    and may override :meth:`train_step`, :meth:`validate` and :meth:`finalize`.
    """

    #: the training metrics a step returns, in CSV order
    train_metrics: tuple[str, ...] = ("loss",)
    #: the validation metrics, and the one that selects the best checkpoint (higher is better)
    val_metrics: tuple[str, ...] = ()
    select_metric: str | None = None
    methods: tuple[str, ...] = ("maml",)
    #: whether ``metagrad train --nproc N`` may split the meta-batch: :meth:`sample` returns
    #: a tuple of tensors with the tasks first, and :meth:`train_step` a mean over them
    data_parallel: bool = True

    def __init__(self, cfg: Config, device: torch.device) -> None:
        if cfg.get("method", "maml") not in self.methods:
            raise ConfigError(
                f"bad value {cfg['method']!r} for method: choose one of {', '.join(self.methods)}"
            )
        for key, choices in _CHOICES.items():  # the first choice is the default
            if cfg.get(key, choices[0]) not in choices:
                listed = ", ".join(choices[:-1]) + f" or {choices[-1]}"
                raise ConfigError(f"bad value {cfg[key]!r} for {key}: choose {listed}")
        for key in ("iterations", "meta_batch"):
            if key in cfg and cfg[key] < 1 and not (key == "iterations" and cfg[key] == 0):
                raise ConfigError(f"bad value {cfg[key]!r} for {key}: must be >= 1")
        self.cfg = cfg
        self.device = device

    # -------------------------------------------------------------- to implement
    def build(self) -> MAML:
        raise NotImplementedError

    def sample(self, generator: torch.Generator) -> Batch:
        raise NotImplementedError

    def evaluate(self, maml: MAML) -> dict[str, Any]:
        raise NotImplementedError

    def plot(self, run: Run, baseline: Run | None = None) -> list[Path]:
        raise NotImplementedError

    # -------------------------------------------------------------- defaults
    def optimizer(self, maml: MAML) -> torch.optim.Optimizer:
        # fused: one kernel for all parameters instead of ~10 ops per tensor (for a small
        # model the per-tensor Python loop of the default costs as much as the meta-gradient)
        if self.cfg.get("meta_optimizer", "adam") == "sgd":
            return torch.optim.SGD(maml.parameters(), lr=self.cfg["meta_lr"])
        return torch.optim.Adam(maml.parameters(), lr=self.cfg["meta_lr"], fused=True)

    def scheduler(self, opt: torch.optim.Optimizer) -> LRScheduler | None:
        """The meta learning rate's schedule over ``iterations`` (stepped once per
        iteration, saved in the checkpoint); None when constant."""
        kind, total = self.cfg.get("lr_schedule", "constant"), max(self.cfg["iterations"], 1)
        if kind == "linear":
            return LambdaLR(opt, lambda t: max(0.0, 1.0 - t / total))
        if kind == "cosine":
            return CosineAnnealingLR(
                opt, T_max=total, eta_min=float(self.cfg.get("min_meta_lr", 0.0))
            )
        return None

    def train_step(self, maml: MAML, batch: Batch) -> dict[str, float | Tensor]:
        """Compute the loss of one batch and backpropagate it (the caller steps).

        Returns metrics as floats or detached 0-dim tensors; the training loop reads
        tensors only when it logs, so a GPU is not synchronised every iteration."""
        loss = maml.meta_backward(*batch)
        return {"loss": loss}

    def validate(self, maml: MAML) -> dict[str, float]:
        return {}

    def finalize(self, maml: MAML) -> dict[str, Any]:
        """Called once after training; what it returns is stored with the checkpoint."""
        return {}

    def apply_extra(self, maml: MAML, extra: dict[str, Any]) -> None:
        if "inner_lr" in extra:
            maml.inner_lr = float(extra["inner_lr"])

    def load_trained(self, run: Run, device: torch.device, checkpoint: str = "best") -> MAML:
        """The trained ``MAML``: ``checkpoint="best"`` the best validated parameters when
        the run has them (else the last), ``"last"`` the parameters training ended with."""
        return self.load_trained_with_source(run, device, checkpoint)[0]

    def load_trained_with_source(
        self, run: Run, device: torch.device, checkpoint: str = "best"
    ) -> tuple[MAML, dict[str, Any]]:
        """:meth:`load_trained`, and which file and iteration the parameters came from."""
        if checkpoint not in ("best", "last"):
            raise ValueError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
        maml = self.build().to(device)
        ckpt = run.load(CHECKPOINT, map_location=device)
        file, chosen = CHECKPOINT, ckpt
        if checkpoint == "best" and run.has_checkpoint(BEST):
            file, chosen = BEST, run.load(BEST, map_location=device)
        maml.load_state_dict(chosen["model"])
        self.apply_extra(maml, ckpt.get("extra", {}))
        return maml, {"file": file, "iteration": chosen.get("iteration")}
