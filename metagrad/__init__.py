"""metagrad: gradient-based meta-learning (MAML and its family) on torch.func."""

from . import models, tasks
from .algorithms import ANIL, MAMLpp, MetaSGD, Reptile, iMAML
from .core import MAML, Adapted, inner

__version__ = "0.1.0"


def load_run(path: str, device: str = "cpu", checkpoint: str = "best") -> MAML:
    """The trained learner (``MAML`` or a subclass) of a run directory from ``metagrad train``:
    its best validated parameters when it has them (``checkpoint="best"``), or those training
    ended with (``"last"``). Checkpoints are read weights-only: loading never runs code."""
    from .experiments.runs import load_run as _load

    return _load(path, device=device, checkpoint=checkpoint)


__all__ = [
    "ANIL",
    "MAML",
    "MAMLpp",
    "Adapted",
    "MetaSGD",
    "Reptile",
    "iMAML",
    "inner",
    "load_run",
    "models",
    "tasks",
    "__version__",
]
