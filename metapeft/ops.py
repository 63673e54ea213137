"""The fused primitives of metapeft, as MLX operations.

Each function here builds one lazy MLX array (or a tree of them) on a C++
primitive with CPU (BLAS) and Metal kernels, and supports ``mx.grad``,
``mx.jvp``, ``mx.vmap`` and ``mx.compile``. :mod:`metapeft.reference` holds the
pure-MLX twin of each one.

Supported dtypes are float32, float16 and bfloat16; products accumulate in
float32. Bad shapes raise ``ValueError`` and bad dtypes ``TypeError``, both
naming the argument.
"""

from __future__ import annotations

import math
import re
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from metapeft import _ext

__all__ = ["linear", "lora_linear", "task_sgd", "reptile_update"]

# Where to run an op, as in MLX: None (the default stream), a stream or a device.
Stream = mx.Stream | mx.Device | None


def linear(
    x: mx.array,
    weight: mx.array,
    bias: mx.array | None = None,
    *,
    stream: Stream = None,
) -> mx.array:
    """Affine map ``x @ weight.T + bias``, computed with BLAS.

    Args:
        x: Input of shape ``(..., d_in)``; with per-task weights, ``(T, ..., d_in)``.
        weight: ``(d_out, d_in)`` as in ``mlx.nn.Linear``, or ``(T, d_out, d_in)``
            for one weight per task.
        bias: Optional ``(d_out,)``, or ``(T, d_out)`` with per-task weights.
        stream: Stream or device to run on (MLX's convention); default stream if None.

    Returns:
        Array of shape ``(..., d_out)``.

    Example:
        >>> x, w = mx.ones((4, 3)), mx.ones((2, 3))
        >>> linear(x, w).shape
        (4, 2)
    """
    return _ext.linear(x, weight, bias, stream=stream)


def lora_linear(
    x: mx.array,
    weight: mx.array,
    lora_a: mx.array,
    lora_b: mx.array,
    scale: float,
    bias: mx.array | None = None,
    *,
    stream: Stream = None,
) -> mx.array:
    """Fused LoRA layer ``x @ weight.T + bias + scale * (x @ lora_a) @ lora_b``.

    The low-rank update is applied as two thin products, never as a
    ``(d_in, d_out)`` matrix. Adapter layout follows mlx-lm.

    Args:
        x: ``(..., d_in)`` with one adapter; ``(T, ..., d_in)`` with per-task adapters.
        weight: Frozen base weight ``(d_out, d_in)`` (or ``(T, d_out, d_in)``).
        lora_a: ``(d_in, r)``, or ``(T, d_in, r)`` for one adapter per task.
        lora_b: ``(r, d_out)``, or ``(T, r, d_out)``.
        scale: Finite float multiplying the low-rank term (``alpha / r``).
        bias: Optional ``(d_out,)`` or ``(T, d_out)``.
        stream: Stream or device to run on; default stream if None.

    Returns:
        Array of shape ``(..., d_out)``.

    Example:
        >>> x, w = mx.ones((8, 16)), mx.zeros((4, 16))
        >>> a, b = mx.ones((16, 2)), mx.ones((2, 4))
        >>> lora_linear(x, w, a, b, scale=0.5).shape
        (8, 4)
    """
    _check_finite("scale", scale)
    return _ext.lora_linear(x, weight, lora_a, lora_b, float(scale), bias, stream=stream)


def task_sgd(params: Any, grads: Any, lr: float | Any, *, stream: Stream = None) -> Any:
    """One SGD step for every task of a meta-batch: ``params - lr * grads``.

    One primitive updates up to 16 leaves at once (larger trees take one per 16
    leaves: MLX's cost per primitive grows with outputs times inputs). The result
    keeps each parameter's dtype; arithmetic is in float32. Differentiable in
    ``params``, ``grads`` and ``lr`` (MAML differentiates through it, Meta-SGD
    learns ``lr``).

    Args:
        params: Tree (dicts, lists, tuples) of arrays, each with a leading task axis.
        grads: Tree of the same structure and shapes as ``params``.
        lr: A finite float, an array broadcasting against every parameter (e.g. a
            learned scalar), or a tree like ``params`` whose leaves broadcast against
            the matching parameter (per-parameter learning rates, as in Meta-SGD).
            Array learning rates are not checked for NaN (that would force evaluation).
        stream: Stream or device to run on; default stream if None.

    Returns:
        Tree like ``params``.

    Example:
        >>> p = {"w": mx.ones((5, 3))}
        >>> task_sgd(p, {"w": mx.ones((5, 3))}, 0.1)["w"][0, 0].item()
        0.9
    """
    if isinstance(lr, (int, float)):
        _check_finite("lr", lr)
    try:
        return _ext.task_sgd(params, grads, lr, stream=stream)
    except (ValueError, TypeError) as e:
        raise _explain(e, params, grads=grads, lr=lr) from None


def reptile_update(
    params: Any, adapted: Any, epsilon: float | mx.array, *, stream: Stream = None
) -> Any:
    """Reptile outer step ``params + epsilon * (mean_T(adapted) - params)``.

    Args:
        params: Tree of meta-parameters.
        adapted: Tree like ``params`` whose leaves carry a leading task axis ``T``.
        epsilon: Outer step size: a finite float or a scalar array.
        stream: Stream or device to run on; default stream if None.

    Returns:
        Tree like ``params``.

    Example:
        >>> p = {"w": mx.zeros((3,))}
        >>> reptile_update(p, {"w": mx.ones((4, 3))}, 0.5)["w"][0].item()
        0.5
    """
    if isinstance(epsilon, (int, float)):
        _check_finite("epsilon", epsilon)
    elif not isinstance(epsilon, mx.array):
        raise TypeError(f"epsilon must be a float or an mx.array, got {type(epsilon).__name__}")
    try:
        return _ext.reptile_update(params, adapted, epsilon, stream=stream)
    except (ValueError, TypeError) as e:
        raise _explain(e, params, adapted=adapted) from None


def _check_finite(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def _explain(error: Exception, params: Any, **trees: Any) -> Exception:
    """The extension's error, naming leaves by their paths (``params['w']``)."""
    message = str(error)
    for name, tree in {"params": params, **trees}.items():
        if isinstance(tree, (int, float, mx.array)):
            continue
        for key, leaf in tree_flatten(tree):
            if not isinstance(leaf, mx.array):
                return TypeError(f"{name}['{key}'] must be an mx.array, got {type(leaf).__name__}")
    keys = [k for k, _ in tree_flatten(params)]
    if "same tree structure" in message:
        name = message.split()[0]
        other = [k for k, _ in tree_flatten(trees[name])]
        return ValueError(f"{message}: params has leaves {keys}, {name} has {other}")
    named = re.sub(
        r"\b(params|grads|lr|adapted)\[(\d+)\]",
        lambda m: f"{m[1]}['{keys[int(m[2])]}']",
        message,
    )
    return type(error)(named)
