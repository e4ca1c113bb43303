"""metagrad: gradient-based meta-learning (MAML and its family) on torch.func."""

from . import models, tasks
from .algorithms import ANIL, MetaSGD
from .core import MAML, Adapted, inner

__version__ = "0.1.0"


def load_run(path: str, device: str = "cpu") -> MAML:
    """The trained learner (``MAML`` or a subclass) of a run directory from ``metagrad train``."""
    from .experiments.runs import load_run as _load

    return _load(path, device=device)


__all__ = [
    "ANIL",
    "MAML",
    "Adapted",
    "MetaSGD",
    "inner",
    "load_run",
    "models",
    "tasks",
    "__version__",
]
