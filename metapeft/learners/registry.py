"""The algorithm registry: each meta-learning algorithm under its name.

It is the one list of algorithms: training runs, the language-model path, the
benchmarks and the config's allowed names all read it, and
:mod:`metapeft.learners` (and :mod:`metapeft`) export every class registered here
under its class name. A new algorithm is one learner file plus one line below.

Example:
    >>> sorted(ALGORITHMS)
    ['anil', 'fomaml', 'maml', 'metasgd', 'reptile']
    >>> build_learner("maml", nn.Linear(1, 1), outer_lr=1e-3).name  # doctest: +SKIP
    'maml'
"""

from __future__ import annotations

from typing import Any

import mlx.nn as nn

from metapeft.learners.anil import ANIL
from metapeft.learners.base import MetaLearner
from metapeft.learners.maml import FOMAML, MAML
from metapeft.learners.metasgd import MetaSGD
from metapeft.learners.reptile import Reptile

__all__ = ["ALGORITHMS", "build_learner", "get_algorithm"]

ALGORITHMS: dict[str, type[MetaLearner]] = {
    cls.name: cls for cls in (MAML, FOMAML, MetaSGD, Reptile, ANIL)
}


def get_algorithm(name: str) -> type[MetaLearner]:
    """The learner class registered as ``name``.

    Raises:
        ValueError: If no algorithm has that name (the message lists them).
    """
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; expected one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


def build_learner(name: str, model: nn.Module, *, outer_lr: float, **kwargs: Any) -> MetaLearner:
    """The learner ``name`` on ``model`` with its usual outer optimizer at step size
    ``outer_lr`` (bias-corrected Adam; Reptile's own step, ``epsilon``); ``kwargs``
    go to its constructor (``inner_lr``, ``inner_steps``, ``loss_fn``, ``batched``,
    ``fast``, ``inner_optimizer``)."""
    return get_algorithm(name).from_settings(model, outer_lr, **kwargs)
