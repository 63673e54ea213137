"""Meta-learners that adapt every task of a meta-batch at once."""

from metapeft.learners.base import MetaLearner
from metapeft.learners.maml import FOMAML, MAML
from metapeft.learners.metasgd import MetaSGD
from metapeft.learners.reptile import Reptile

__all__ = ["MetaLearner", "MAML", "FOMAML", "MetaSGD", "Reptile"]
