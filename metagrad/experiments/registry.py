"""The presets table, and which experiment class runs a config (by its ``experiment`` key)."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from . import fewshot, rl, sinusoid
from .base import Experiment
from .config import Config, preset, presets
from .fewshot import ImageFolderExperiment, MiniImagenetExperiment, OmniglotExperiment
from .rl import RLExperiment
from .sinusoid import SinusoidExperiment

#: every preset, by name: (description, defaults); a new experiment adds its table here
PRESETS: dict[str, tuple[str, Config]] = {**sinusoid.PRESETS, **fewshot.PRESETS, **rl.PRESETS}

EXPERIMENTS: dict[str, type[Experiment]] = {
    "sinusoid": SinusoidExperiment,
    "omniglot": OmniglotExperiment,
    "miniimagenet": MiniImagenetExperiment,
    "folder": ImageFolderExperiment,
    "rl": RLExperiment,
}


def experiment_for(cfg: Config, device: torch.device | None = None) -> Experiment:
    kind = cfg.get("experiment")
    if kind not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {kind!r} in config; known: {', '.join(EXPERIMENTS)}")
    name = cfg.get("preset")
    if name in presets():  # keys added to the preset since the run was made: defaults
        cfg = preset(name) | dict(cfg)
    return EXPERIMENTS[kind](cfg, device or torch.device("cpu"))
