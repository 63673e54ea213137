"""Meta-learners that adapt every task of a meta-batch at once.

Every algorithm in :data:`~metapeft.learners.registry.ALGORITHMS` is exported here
under its class name (``MAML``, ``FOMAML``, ``MetaSGD``, ``Reptile``, ...).
"""

from typing import Any

from metapeft.learners import inner
from metapeft.learners.base import MetaLearner
from metapeft.learners.registry import ALGORITHMS, build_learner, get_algorithm

__all__ = [
    "ALGORITHMS",
    "MetaLearner",
    "build_learner",
    "get_algorithm",
    "inner",
    *(cls.__name__ for cls in ALGORITHMS.values()),
]


def __getattr__(name: str) -> Any:
    for cls in ALGORITHMS.values():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module 'metapeft.learners' has no attribute {name!r}")
