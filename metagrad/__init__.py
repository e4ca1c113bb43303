"""metagrad: gradient-based meta-learning (MAML) on torch.func."""

from . import models, tasks
from .core import MAML, Adapted

__version__ = "0.1.0"


def load_run(path: str, device: str = "cpu") -> MAML:
    """The trained ``MAML`` module of a run directory written by ``metagrad train``."""
    from .experiments.runs import load_run as _load

    return _load(path, device=device)


__all__ = ["MAML", "Adapted", "load_run", "models", "tasks", "__version__"]
