"""Which experiment class runs a config (by its ``experiment`` key)."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import Experiment
from .config import Config
from .fewshot import MiniImagenetExperiment, OmniglotExperiment
from .sinusoid import SinusoidExperiment

EXPERIMENTS: dict[str, type[Experiment]] = {
    "sinusoid": SinusoidExperiment,
    "omniglot": OmniglotExperiment,
    "miniimagenet": MiniImagenetExperiment,
}


def experiment_for(cfg: Config, device: torch.device | None = None) -> Experiment:
    kind = cfg.get("experiment")
    if kind not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {kind!r} in config; known: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[kind](cfg, device or torch.device("cpu"))
