"""Few-shot image-classification data: Omniglot, MiniImagenet and a vectorised task sampler."""

from .errors import DataError
from .miniimagenet import load_miniimagenet
from .omniglot import (
    OmniglotArrays,
    download_omniglot,
    load_omniglot,
    omniglot_split_indices,
    read_omniglot,
)
from .sampler import FewShotDataset, FewShotSampler, TaskBatch

__all__ = [
    "DataError",
    "FewShotDataset",
    "FewShotSampler",
    "OmniglotArrays",
    "TaskBatch",
    "download_omniglot",
    "load_miniimagenet",
    "load_omniglot",
    "omniglot_split_indices",
    "read_omniglot",
]
