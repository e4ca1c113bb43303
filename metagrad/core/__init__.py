"""The core: torch only. Parameters as dicts, the inner loop as a pure function
(:mod:`.adapt`), the adaptation spec (:mod:`.spec`, update rules in :mod:`.inner`),
executors over one per-task function (:mod:`.executors`, :mod:`.compiled`), the exactness
guard (:mod:`.strategy`), shared linear algebra (:mod:`.linalg`), and the ``MAML`` facade."""

from . import inner
from .adapt import Adapted, adapt, support_loss, task_loss
from .executors import Problem
from .functional import batched_forward, forward
from .maml import MAML
from .spec import Hyper, Spec
from .strategy import Verdict, vmap_matches_loop

__all__ = [
    "MAML",
    "Adapted",
    "Hyper",
    "Problem",
    "Spec",
    "Verdict",
    "adapt",
    "batched_forward",
    "forward",
    "inner",
    "support_loss",
    "task_loss",
    "vmap_matches_loop",
]
from . import linalg as linalg  # noqa: E402  (shared CG and Hessian-vector products)
