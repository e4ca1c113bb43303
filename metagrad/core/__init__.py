"""The functional MAML core: parameters as dicts, inner loop as a pure function."""

from .functional import adapt, batched_query_loss, forward, query_loss, sgd_step
from .maml import MAML, Adapted
from .strategy import vmap_matches_loop

__all__ = [
    "MAML",
    "Adapted",
    "adapt",
    "batched_query_loss",
    "forward",
    "query_loss",
    "sgd_step",
    "vmap_matches_loop",
]
