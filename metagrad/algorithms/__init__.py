"""The MAML family, each algorithm a small file on the core's adaptation spec."""

from .anil import ANIL
from .metasgd import MetaSGD

__all__ = ["ANIL", "MetaSGD"]
