"""The registry of task families: a family's name -> how to draw one of its tasks.

A family is a function ``sample(config, rng) -> (support_x, support_y, query_x,
query_y)`` returning numpy arrays for one task, plus what it is (classification or
regression) and two optional checks: ``validate(config)``, cheap and data-free, run
when a :class:`~metapeft.tasks.TaskConfig` is made; ``prepare(config)``, which may
load data, run when a :class:`~metapeft.tasks.TaskDistribution` is made. Both raise
``ValueError`` naming the problem. The built-in families are ``sinusoid`` and
``digits``; :func:`register_family` adds one of your own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["TaskFamily", "get_family", "known_families", "register_family"]

# The functions of a family take a TaskConfig first (not imported here: TaskConfig
# checks its family against this registry).
TaskArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
SampleFn = Callable[[Any, np.random.Generator], TaskArrays]
CheckFn = Callable[[Any], None]


@dataclass(frozen=True)
class TaskFamily:
    """A registered task family.

    Attributes:
        name: The name configs use as ``task_family``.
        sample: ``sample(config, rng)`` draws one task with the numpy ``Generator``
            ``rng`` and returns ``(support_x, support_y, query_x, query_y)``:
            ``x`` of shape ``(n, input_dim)``, ``y`` of shape ``(n, ...)`` (integer
            labels ``0 .. num_classes-1`` for classification), ``n`` being
            ``support_size`` or ``query_size``.
        classification: Whether tasks are N-way classification (int32 labels,
            sizes multiples of ``num_classes``) rather than regression (float32).
        validate: Optional data-free check of a config, run by ``TaskConfig``.
        prepare: Optional check that may load data, run by ``TaskDistribution``.
    """

    name: str
    sample: SampleFn
    classification: bool = False
    validate: CheckFn | None = None
    prepare: CheckFn | None = None


# Filled by register_family; metapeft.tasks registers the built-in families.
_REGISTRY: dict[str, TaskFamily] = {}


def known_families() -> tuple[str, ...]:
    """The names of the registered task families, sorted.

    Example:
        >>> known_families()
        ('digits', 'sinusoid')
    """
    return tuple(sorted(_REGISTRY))


def get_family(name: str) -> TaskFamily:
    """The registered family called ``name``.

    Raises:
        ValueError: If no family has that name (the message lists the known ones).

    Example:
        >>> get_family("digits").classification
        True
    """
    family = _REGISTRY.get(name) if isinstance(name, str) else None
    if family is None:
        raise ValueError(
            f"unknown task_family {name!r}; known families: {', '.join(known_families())}"
        )
    return family


def register_family(
    name: str,
    sample: SampleFn,
    *,
    classification: bool = False,
    validate: CheckFn | None = None,
    prepare: CheckFn | None = None,
    replace: bool = False,
) -> TaskFamily:
    """Register a task family, so that configs can name it as ``task_family``.

    Args:
        name: The family's name.
        sample: ``sample(config, rng) -> (support_x, support_y, query_x, query_y)``,
            numpy arrays for one task drawn with the ``Generator`` ``rng`` (use only
            ``rng`` for randomness, so that sampling is deterministic for a seed).
        classification: True for N-way classification (integer labels).
        validate: Optional data-free check of a config; raises ``ValueError``.
        prepare: Optional check run once per config by ``TaskDistribution``, e.g.
            after loading data; raises ``ValueError``.
        replace: Allow replacing a family registered under the same name.

    Returns:
        The registered :class:`TaskFamily`.

    Raises:
        ValueError: If ``name`` is empty or already registered (and not ``replace``).
        TypeError: If ``sample``, ``validate`` or ``prepare`` is not callable.

    Example:
        >>> def lines(config, rng):
        ...     slope = rng.uniform(-1, 1)
        ...     x = rng.uniform(-1, 1, (config.support_size + config.query_size, 1))
        ...     k = config.support_size
        ...     return x[:k], slope * x[:k], x[k:], slope * x[k:]
        >>> register_family("lines", lines).name
        'lines'
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"family name must be a non-empty string, got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"task family {name!r} is already registered; pass replace=True")
    for arg, fn in (("sample", sample), ("validate", validate), ("prepare", prepare)):
        if not callable(fn) and not (fn is None and arg != "sample"):
            raise TypeError(f"{arg} must be callable, got {type(fn).__name__}")
    family = TaskFamily(name, sample, bool(classification), validate, prepare)
    _REGISTRY[name] = family
    return family
