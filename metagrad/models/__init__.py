"""Reference networks of the MAML paper."""

from .mlp import MLP

__all__ = ["MLP"]
