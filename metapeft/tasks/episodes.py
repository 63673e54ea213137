"""Episodes: the support and query sets of a meta-batch, with a leading task axis."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

__all__ = ["Episodes"]

_FIELDS = ("support_x", "support_y", "query_x", "query_y")


@dataclass(frozen=True, eq=False)
class Episodes:
    """The support and query sets of ``T`` tasks, stacked on a leading task axis.

    :meth:`TaskDistribution.sample <metapeft.tasks.TaskDistribution.sample>` makes
    them; you can also build one from your own arrays (numpy arrays are converted
    to ``mx.array``). Shapes are ``(T, n_support, ...)`` for ``support_x`` and
    ``support_y`` and ``(T, n_query, ...)`` for ``query_x`` and ``query_y``.

    Attributes:
        support_x: Inputs to adapt on, ``(T, n_support, ...)``.
        support_y: Their targets, ``(T, n_support, ...)``.
        query_x: Inputs to evaluate the adapted model on, ``(T, n_query, ...)``.
        query_y: Their targets, ``(T, n_query, ...)``.

    Raises:
        TypeError: If a field is not an ``mx.array`` or numpy array.
        ValueError: If there are no tasks (``T == 0``), a field has rank < 2, the
            fields disagree on ``T``, ``x`` and ``y`` disagree on the number of
            examples, or support and query disagree on the shape of one example.

    Example:
        >>> e = Episodes(mx.zeros((4, 5, 1)), mx.zeros((4, 5, 1)),
        ...              mx.zeros((4, 10, 1)), mx.zeros((4, 10, 1)))
        >>> e.num_tasks, e.task(2).support_x.shape
        (4, (1, 5, 1))
    """

    support_x: mx.array
    support_y: mx.array
    query_x: mx.array
    query_y: mx.array

    def __post_init__(self) -> None:
        for name in _FIELDS:
            value = getattr(self, name)
            if isinstance(value, np.ndarray):
                object.__setattr__(self, name, mx.array(value))
            elif not isinstance(value, mx.array):
                raise TypeError(
                    f"{name} must be an mx.array or a numpy array, got {type(value).__name__}"
                )
        shapes = {name: tuple(getattr(self, name).shape) for name in _FIELDS}
        described = ", ".join(f"{n} {s}" for n, s in shapes.items())
        for name, shape in shapes.items():
            if len(shape) < 2:
                raise ValueError(
                    f"{name} must have rank >= 2 (tasks, examples, ...), got shape {shape}"
                )
        if len({s[0] for s in shapes.values()}) > 1:
            raise ValueError(f"the fields disagree on the number of tasks T: {described}")
        if shapes["support_x"][0] == 0:
            raise ValueError(f"no tasks: T is 0 ({described})")
        for part in ("support", "query"):
            x, y = shapes[f"{part}_x"], shapes[f"{part}_y"]
            if x[1] != y[1]:
                raise ValueError(
                    f"{part}_x and {part}_y disagree on the number of examples: "
                    f"{part}_x {x}, {part}_y {y}"
                )
        for kind in ("x", "y"):
            s, q = shapes[f"support_{kind}"], shapes[f"query_{kind}"]
            if s[2:] != q[2:]:
                raise ValueError(
                    f"support_{kind} and query_{kind} disagree on the shape of one "
                    f"example: support_{kind} {s}, query_{kind} {q}"
                )

    @property
    def num_tasks(self) -> int:
        """The number of tasks ``T``."""
        return self.support_x.shape[0]

    @property
    def support(self) -> tuple[mx.array, mx.array]:
        """``(support_x, support_y)``."""
        return self.support_x, self.support_y

    @property
    def query(self) -> tuple[mx.array, mx.array]:
        """``(query_x, query_y)``."""
        return self.query_x, self.query_y

    def task(self, i: int) -> Episodes:
        """Task ``i`` alone, keeping a leading task axis of 1.

        Args:
            i: Index of the task; negative counts from the end.

        Raises:
            TypeError: If ``i`` is not an int.
            IndexError: If ``i`` is out of range.

        Example:
            >>> e = Episodes(mx.zeros((3, 2, 1)), mx.zeros((3, 2)),
            ...              mx.zeros((3, 4, 1)), mx.zeros((3, 4)))
            >>> e.task(-1).query_y.shape
            (1, 4)
        """
        if isinstance(i, bool) or not hasattr(i, "__index__"):
            raise TypeError(f"task index must be an int, got {type(i).__name__}")
        t = self.num_tasks
        j = i.__index__() + (t if i < 0 else 0)
        if not 0 <= j < t:
            raise IndexError(f"task index {i} out of range for {t} tasks")
        return Episodes(*(getattr(self, name)[j : j + 1] for name in _FIELDS))

    def tasks(self) -> Iterator[Episodes]:
        """Iterate over the tasks one at a time, as :meth:`task` returns them.

        Example:
            >>> e = Episodes(mx.zeros((3, 2, 1)), mx.zeros((3, 2)),
            ...              mx.zeros((3, 4, 1)), mx.zeros((3, 4)))
            >>> [t.num_tasks for t in e.tasks()]
            [1, 1, 1]
        """
        for i in range(self.num_tasks):
            yield self.task(i)
