"""The MAML family, each algorithm a small file on the core's adaptation spec."""

from .anil import ANIL
from .imaml import iMAML
from .metasgd import MetaSGD
from .reptile import Reptile

__all__ = ["ANIL", "MetaSGD", "Reptile", "iMAML"]
