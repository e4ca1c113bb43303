"""Few-shot image-classification data: Omniglot, MiniImagenet, your own image folders and a
vectorised task sampler."""

from .errors import DataError
from .folder import load_image_folder
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
    "load_image_folder",
    "load_miniimagenet",
    "load_omniglot",
    "omniglot_split_indices",
    "read_omniglot",
]
