"""Reference networks of the MAML paper."""

from .conv import Conv4, FCNet, miniimagenet_conv4, omniglot_conv4
from .mlp import MLP

__all__ = ["MLP", "Conv4", "FCNet", "omniglot_conv4", "miniimagenet_conv4"]
