"""TensorBoard event files beside ``metrics.csv`` (optional: the ``tensorboard`` package).

``tensorboard --logdir runs/`` then shows every run's logged metrics (``train/``,
``val/``), the meta learning rate and the learned inner rates. Config key ``tensorboard``:
``auto`` (on when the package is installed), ``true`` (an error without it), ``false``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core import MAML
from ..errors import ConfigError
from .runs import Run

DIRNAME = "tensorboard"
_PER_STEP_MAX = 16  # learned rate tensors up to this size are logged entry by entry


class Board:
    """Writes the rows the training loop logs; resumed runs drop events past the resume point."""

    def __init__(self, run: Run, start: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events a crashed run wrote after its last checkpoint are discarded
        self.writer = SummaryWriter(
            str(run.path / DIRNAME), purge_step=start + 1 if start else None
        )

    def log(
        self, row: dict[str, Any], iteration: int, maml: MAML, opt: torch.optim.Optimizer
    ) -> None:
        for key, value in row.items():
            if isinstance(value, int | float) and key not in ("iteration", "elapsed_s"):
                tag = key.replace("val_", "val/", 1) if key.startswith("val_") else f"train/{key}"
                self.writer.add_scalar(tag, value, iteration)
        lr = opt.param_groups[0].get("lr") if opt.param_groups else None
        if isinstance(lr, int | float):  # TRPO has no learning rate
            self.writer.add_scalar("meta_lr", lr, iteration)
        for name, rate in maml.learned_lrs().items():
            r = rate.detach().float().cpu().flatten()
            if r.numel() <= _PER_STEP_MAX:
                for k, v in enumerate(r.tolist()):
                    self.writer.add_scalar(f"inner_lr/{name}/step{k}", v, iteration)
            else:
                self.writer.add_scalar(f"inner_lr/{name}/mean", float(r.mean()), iteration)

    def close(self) -> None:
        self.writer.close()


def board(cfg: dict[str, Any], run: Run, start: int) -> Board | None:
    """A :class:`Board` for the run, or None when TensorBoard is off or not installed."""
    mode = str(cfg.get("tensorboard", "auto")).lower()
    if mode == "false":
        return None
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        if mode == "true":
            raise ConfigError("tensorboard=true needs the tensorboard package: "
                              "pip install 'metagrad[tensorboard]'") from None  # fmt: skip
        return None
    return Board(run, start)
