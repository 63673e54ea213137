"""How the tasks of a meta-batch are mapped, chosen once for every algorithm.

- :data:`ALL_AT_ONCE`: ``mx.vmap`` over the task axis. Each layer runs one batched
  kernel for all tasks (the fused primitives' vmap rules), and the meta-step compiles.
- :data:`ONE_AT_A_TIME`: a Python loop over tasks, evaluated task by task with the
  gradients accumulated, so memory holds one task's graph: for models MLX cannot
  ``vmap`` (quantized products, ``mx.checkpoint``) and as the reference the batched
  path is tested against.

A task function takes ``(meta, support_x, support_y, query_x, query_y)`` of one task.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx.utils import tree_map

__all__ = ["ALL_AT_ONCE", "ONE_AT_A_TIME", "TaskMap"]

TaskFn = Callable[..., Any]


class TaskMap:
    """All at once (``vectorized``) or one at a time."""

    def __init__(self, vectorized: bool) -> None:
        self.vectorized = vectorized

    @property
    def compiles(self) -> bool:
        """Whether a meta-step under this mapping can be wrapped in ``mx.compile``
        (the loop evaluates between tasks)."""
        return self.vectorized

    def stack(self, fn: TaskFn, meta: Any, data: tuple) -> Any:
        """``fn`` on every task, its outputs stacked on a leading task axis."""
        if self.vectorized:
            return mx.vmap(fn, in_axes=(None, 0, 0, 0, 0))(meta, *data)
        outputs = []
        for t in range(data[0].shape[0]):
            outputs.append(fn(meta, *(a[t] for a in data)))
            mx.eval(outputs[-1])
        return tree_map(lambda *leaves: mx.stack(leaves), *outputs)

    def value_and_grad(self, objective: TaskFn, meta: Any, data: tuple) -> tuple[tuple, Any]:
        """The means over tasks of ``objective``'s outputs (a tuple of scalars) and the
        gradient of the mean of the first with respect to ``meta``."""
        if self.vectorized:

            def mean_objective(m: Any, *d: mx.array) -> tuple:
                per_task = mx.vmap(objective, in_axes=(None, 0, 0, 0, 0))(m, *d)
                return tuple(r.mean() for r in per_task)

            return mx.value_and_grad(mean_objective)(meta, *data)
        grad_fn = mx.value_and_grad(objective)
        tasks = data[0].shape[0]
        total, grads = None, None
        for t in range(tasks):
            values, g = grad_fn(meta, *(a[t] for a in data))
            total = values if total is None else tuple(map(mx.add, total, values))
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(total, grads)
        return tuple(v / tasks for v in total), tree_map(lambda g: g / tasks, grads)


ALL_AT_ONCE = TaskMap(vectorized=True)
ONE_AT_A_TIME = TaskMap(vectorized=False)
