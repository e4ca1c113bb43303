"""The MAML family, each algorithm a small file on the core's adaptation spec."""

from .anil import ANIL
from .imaml import iMAML
from .mamlpp import MAMLpp, msl_weights
from .metasgd import MetaSGD
from .reptile import Reptile

__all__ = ["ANIL", "MAMLpp", "MetaSGD", "Reptile", "iMAML", "msl_weights"]
