"""Inner-loop optimizers: ``(init, update)`` pairs with explicit state, in the shape of
optax's gradient transformations.

``init(params) -> state`` and ``update(params, grads, state, lr) -> (params, state)``
for one task's parameter tree. ``lr`` is the inner learning rate: a float, or a tree
like ``params`` (Meta-SGD's learned per-parameter rates). Every update is made of
differentiable MLX operations (SGD of :func:`metapeft.ops.task_sgd`), so second-order
MAML differentiates through it, state included, and every one runs under ``mx.vmap``
(one state per task).

Example:
    >>> from metapeft.learners import MAML, inner
    >>> learner = MAML(model, inner_lr=0.01, inner_optimizer=inner.adam())  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import mlx.core as mx
from mlx.utils import tree_map

from metapeft import ops

__all__ = ["InnerOptimizer", "adam", "momentum", "sgd"]


class InnerOptimizer(NamedTuple):
    """An inner-loop optimizer: ``init(params) -> state`` and
    ``update(params, grads, state, lr) -> (new params, new state)``."""

    init: Callable[[Any], Any]
    update: Callable[[Any, Any, Any, Any], tuple[Any, Any]]


def _rate_times(lr: Any, tree: Any) -> Any:
    """``lr * tree`` leaf by leaf, for a float ``lr`` or a tree of rates like ``tree``."""
    if isinstance(lr, (int, float)):
        return tree_map(lambda t: lr * t, tree)
    return tree_map(lambda r, t: r * t, lr, tree)


def _check_unit(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and 0 <= value < 1):
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    return float(value)


def sgd() -> InnerOptimizer:
    """Plain SGD, ``params - lr * grads``, on the fused :func:`metapeft.ops.task_sgd`
    (one primitive per 16 leaves of the tree). No state.

    Example:
        >>> opt = sgd()
        >>> params, state = opt.update({"w": mx.ones(2)}, {"w": mx.ones(2)}, opt.init(None), 0.5)
        >>> params["w"].tolist()
        [0.5, 0.5]
    """

    def update(params: Any, grads: Any, state: Any, lr: Any) -> tuple[Any, Any]:
        return ops.task_sgd(params, grads, lr), state

    return InnerOptimizer(lambda params: (), update)


def momentum(beta: float = 0.9) -> InnerOptimizer:
    """SGD with heavy-ball momentum: ``v = beta * v + grads``, ``params - lr * v``; the
    velocity starts at zero for every task.

    Example:
        >>> opt = momentum(0.5)
        >>> p, v = {"w": mx.zeros(1)}, opt.init({"w": mx.zeros(1)})
        >>> for _ in range(2):
        ...     p, v = opt.update(p, {"w": mx.ones(1)}, v, 1.0)
        >>> p["w"].item()  # -1, then -1 - 1.5
        -2.5
    """
    beta = _check_unit("beta", beta)

    def update(params: Any, grads: Any, state: Any, lr: Any) -> tuple[Any, Any]:
        velocity = tree_map(lambda v, g: beta * v + g, state, grads)
        step = _rate_times(lr, velocity)
        return tree_map(lambda p, s: p - s, params, step), velocity

    return InnerOptimizer(lambda params: tree_map(mx.zeros_like, params), update)


def adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 1e-16
) -> InnerOptimizer:
    """Adam (Kingma and Ba 2015) with bias correction; moments start at zero for every
    task. ``eps_root`` is added under the square root (as optax's ``eps_root``): it
    keeps the derivative of the update finite where a gradient is exactly zero (an
    untouched adapter), which second-order MAML differentiates.

    Example:
        >>> opt = adam()
        >>> params, state = opt.update({"w": mx.zeros(1)}, {"w": mx.ones(1)},
        ...                            opt.init({"w": mx.zeros(1)}), 0.1)
        >>> round(params["w"].item(), 4)  # the first step has size lr
        -0.1
    """
    b1, b2 = _check_unit("b1", b1), _check_unit("b2", b2)
    for name, value in (("eps", eps), ("eps_root", eps_root)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")

    def init(params: Any) -> dict[str, Any]:
        zeros = tree_map(mx.zeros_like, params)
        return {"m": zeros, "v": zeros, "count": mx.array(0, mx.int32)}

    def update(params: Any, grads: Any, state: Any, lr: Any) -> tuple[Any, Any]:
        count = state["count"] + 1
        m = tree_map(lambda m, g: b1 * m + (1 - b1) * g, state["m"], grads)
        v = tree_map(lambda v, g: b2 * v + (1 - b2) * mx.square(g), state["v"], grads)
        c1 = 1 - mx.power(b1, count.astype(mx.float32))
        c2 = 1 - mx.power(b2, count.astype(mx.float32))
        direction = tree_map(lambda m, v: (m / c1) / (mx.sqrt(v / c2 + eps_root) + eps), m, v)
        step = _rate_times(lr, direction)
        new = tree_map(lambda p, s: (p - s).astype(p.dtype), params, step)
        return new, {"m": m, "v": v, "count": count}

    return InnerOptimizer(init, update)
