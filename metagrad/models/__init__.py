"""Reference networks of the MAML paper, and MAML++'s per-step BatchNorm network."""

from .conv import Conv4, FCNet, StepConv4, mamlpp_conv4, miniimagenet_conv4, omniglot_conv4
from .mlp import MLP
from .norm import StepBatchNorm

__all__ = [
    "MLP", "Conv4", "FCNet", "StepBatchNorm", "StepConv4", "mamlpp_conv4", "omniglot_conv4",
    "miniimagenet_conv4",
]  # fmt: skip
