"""The functional core shared by every learner.

A learner never mutates the user's model during the inner loop: parameters live
in trees, and the model is called with a given tree through :func:`call_with`,
which restores the model's own parameters afterwards. The inner loop for one task
is a pure function of the parameters, the task's support set and the inner
optimizer (:mod:`metapeft.learners.inner`); :mod:`metapeft.learners.mapping` runs
it on every task of a meta-batch, all at once or one at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from metapeft import ops
from metapeft.learners.inner import InnerOptimizer

LossFn = Callable[[nn.Module, mx.array, mx.array], mx.array]


def call_with(model: nn.Module, params: Any, fn: Callable[[nn.Module], Any]) -> Any:
    """Runs ``fn(model)`` with ``params`` in place of the model's own, then restores them."""
    saved = model.trainable_parameters()
    model.update(params)
    try:
        return fn(model)
    finally:
        model.update(saved)


def make_task_loss(
    model: nn.Module, loss_fn: LossFn
) -> Callable[[Any, mx.array, mx.array], mx.array]:
    """``loss(params, x, y)`` for one task: ``loss_fn(model, x, y)`` with ``params``."""

    def task_loss(params: Any, x: mx.array, y: mx.array) -> mx.array:
        loss = call_with(model, params, lambda m: loss_fn(m, x, y))
        if not isinstance(loss, mx.array) or loss.ndim != 0:
            shape = getattr(loss, "shape", type(loss).__name__)
            raise ValueError(f"loss_fn must return a scalar mx.array for one task, got {shape}")
        return loss

    return task_loss


def inner_loop(
    task_loss: Callable[[Any, mx.array, mx.array], mx.array],
    params: Any,
    x: mx.array,
    y: mx.array,
    lr: Any,
    steps: int,
    optimizer: InnerOptimizer,
    first_order: bool,
) -> tuple[Any, mx.array]:
    """``steps`` steps of the inner ``optimizer`` on one task's support set, from a
    fresh optimizer state.

    Returns the adapted parameters and the support loss before adaptation. With
    ``first_order`` the inner gradients are treated as constants (FOMAML, Reptile),
    so no second-order graph is built.
    """
    grad_fn = mx.value_and_grad(task_loss)
    state = optimizer.init(params)
    first_loss = None
    for _ in range(steps):
        loss, grads = grad_fn(params, x, y)
        if first_order:
            grads = stop_gradient(grads)
        first_loss = loss if first_loss is None else first_loss
        params, state = optimizer.update(params, grads, state, lr)
    if first_loss is None:
        first_loss = task_loss(params, x, y)
    return params, first_loss


def split_tree(tree: Any, keys: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The leaves of ``tree`` at the flat paths in ``keys``, and the others, as two flat
    ``{path: leaf}`` dicts; :func:`merge_trees` puts them back together."""
    flat = dict(tree_flatten(tree))
    return (
        {k: v for k, v in flat.items() if k in keys},
        {k: v for k, v in flat.items() if k not in keys},
    )


def merge_trees(*flat: dict[str, Any]) -> Any:
    """The nested tree of the flat ``{path: leaf}`` dicts, together."""
    merged: dict[str, Any] = {}
    for part in flat:
        merged.update(part)
    return tree_unflatten(list(merged.items()))


def stop_gradient(tree: Any) -> Any:
    """``mx.stop_gradient`` on every leaf of a tree."""
    return tree_map(mx.stop_gradient, tree)


def tree_distance(a: Any, b: Any) -> mx.array:
    """Euclidean distance between two trees with the same leaves, as ``tree_flatten``
    lists them (so empty containers, such as a module's ``dropout: {}``, do not count)."""
    leaves_a, leaves_b = [x for _, x in tree_flatten(a)], [y for _, y in tree_flatten(b)]
    return mx.sqrt(ops.squared_distance(leaves_a, leaves_b))


def tree_total(leaves: Iterable[mx.array]) -> mx.array:
    """The sum of every element of every array in ``leaves``, a scalar.

    Each leaf is summed with ``keepdims`` (all-ones shapes broadcast together) and
    the total reshaped once, sparing the graph a squeeze node per leaf: a node costs
    microseconds, and a small meta-step is a few hundred of them. Not for use under
    ``vmap``, where leaves of different ranks cost a broadcast and a transpose each."""
    total = mx.array(0.0)
    for leaf in leaves:
        total = total + mx.sum(leaf, keepdims=True)
    return total.reshape(())
