"""Pure-MLX twins of every compiled primitive in :mod:`metapeft.ops`.

They define the semantics the fused kernels must reproduce, and they are the
baselines the tests and benchmarks compare against.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map


def linear(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """``x @ weight.T + bias``; a 3-D ``weight`` holds one matrix per task."""
    if weight.ndim == 3:
        out = _per_task(x, weight.shape[0]) @ mx.expand_dims(mx.swapaxes(weight, -1, -2), 1)
        out = out.reshape(*x.shape[:-1], weight.shape[1])
    else:
        out = x @ weight.T
    return out if bias is None else out + _bias(bias, x.ndim)


def lora_linear(
    x: mx.array,
    weight: mx.array,
    lora_a: mx.array,
    lora_b: mx.array,
    scale: float,
    bias: mx.array | None = None,
) -> mx.array:
    """``x @ weight.T + bias + scale * (x @ lora_a) @ lora_b``."""
    base = linear(x, weight, bias)
    if lora_a.ndim == 3:
        xt = _per_task(x, lora_a.shape[0])
        low = (xt @ mx.expand_dims(lora_a, 1)) @ mx.expand_dims(lora_b, 1)
        low = low.reshape(*x.shape[:-1], lora_b.shape[-1])
    else:
        low = (x @ lora_a) @ lora_b
    return base + scale * low


def task_sgd(params: Any, grads: Any, lr: Any) -> Any:
    """``params - lr * grads`` leaf by leaf, in float32, keeping each parameter's dtype.

    ``lr`` is a float, an array broadcasting against every leaf, or a tree like ``params``.
    """

    def step(p: mx.array, g: mx.array, a: Any) -> mx.array:
        dtype = mx.result_type(p, g)
        a = a.astype(mx.float32) if isinstance(a, mx.array) else a
        return (p.astype(mx.float32) - a * g.astype(mx.float32)).astype(dtype)

    if isinstance(lr, (int, float, mx.array)):
        return tree_map(lambda p, g: step(p, g, lr), params, grads)
    return tree_map(step, params, grads, lr)


def reptile_update(params: Any, adapted: Any, epsilon: float | mx.array) -> Any:
    """``params + epsilon * (mean over tasks of adapted - params)`` leaf by leaf, in float32."""

    def step(p: mx.array, a: mx.array) -> mx.array:
        dtype = mx.result_type(p, a)
        p32 = p.astype(mx.float32)
        return (p32 + epsilon * (mx.mean(a.astype(mx.float32), axis=0) - p32)).astype(dtype)

    return tree_map(step, params, adapted)


def squared_distance(params: Any, other: Any) -> mx.array:
    """``sum((params - other) ** 2)`` over every leaf, in float32."""
    pairs = zip(tree_flatten(params), tree_flatten(other), strict=True)
    total = mx.array(0.0)
    for (_, p), (_, o) in pairs:
        total = total + mx.sum(mx.square(p.astype(mx.float32) - o.astype(mx.float32)))
    return total


def softmax(x: mx.array, scale: float = 1.0, causal: bool = False) -> mx.array:
    """``mx.softmax`` of ``scale * x`` over the last axis, in float32; with ``causal``,
    query ``i`` of ``L`` sees keys ``j <= i + S - L`` (others are 0)."""
    y = x.astype(mx.float32) * scale
    if not causal:
        return mx.softmax(y, axis=-1, precise=True).astype(x.dtype)
    L, S = x.shape[-2:]
    keep = mx.arange(S) <= mx.arange(L)[:, None] + (S - L)
    # A large finite fill keeps a fully masked row (and its gradient) finite.
    p = mx.softmax(mx.where(keep, y, -3e38), axis=-1, precise=True)
    return mx.where(keep, p, 0.0).astype(x.dtype)


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-row ``logsumexp(logits) - logits[target]`` in float32."""
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[..., None].astype(mx.int32), axis=-1)[..., 0]
    return mx.logsumexp(logits, axis=-1) - picked


def linear_cross_entropy(x: mx.array, weight: mx.array, targets: mx.array) -> mx.array:
    """Per-row cross-entropy of the logits ``x @ weight.T`` in float32."""
    return cross_entropy(x.astype(mx.float32) @ weight.astype(mx.float32).T, targets)


def sigmoid(x: mx.array) -> mx.array:
    """``mx.sigmoid`` computed in float32, in ``x``'s dtype."""
    return mx.sigmoid(x.astype(mx.float32)).astype(x.dtype)


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """``x / sqrt(mean(x**2) + eps) * weight`` in float32, in the promoted dtype."""
    x32 = x.astype(mx.float32)
    out = x32 * mx.rsqrt(mx.mean(mx.square(x32), axis=-1, keepdims=True) + eps)
    return (out * weight.astype(mx.float32)).astype(mx.result_type(x, weight))


def rope(
    x: mx.array,
    dims: int,
    *,
    traditional: bool,
    base: float | None,
    scale: float,
    offset: int,
    freqs: mx.array | None = None,
) -> mx.array:
    """Rotary embeddings written out: angles ``(offset + l) * scale / period_i``."""
    half = dims // 2
    if freqs is None:
        periods = base ** (mx.arange(half, dtype=mx.float32) / half)
    else:
        periods = freqs.astype(mx.float32)
    angles = (mx.arange(x.shape[-2], dtype=mx.float32)[:, None] + offset) * scale / periods
    cos, sin = mx.cos(angles), mx.sin(angles)
    x32 = x.astype(mx.float32)
    if traditional:
        a, b = x32[..., 0:dims:2], x32[..., 1:dims:2]
        rotated = mx.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
        rotated = rotated.reshape(*x.shape[:-1], dims)
    else:
        a, b = x32[..., :half], x32[..., half:dims]
        rotated = mx.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return mx.concatenate([rotated, x32[..., dims:]], axis=-1).astype(x.dtype)


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up`` in float32, in the promoted dtype."""
    g = gate.astype(mx.float32)
    return (g * mx.sigmoid(g) * up.astype(mx.float32)).astype(mx.result_type(gate, up))


def attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    scale: float,
    mask: mx.array | str | None = None,
) -> mx.array:
    """MLX's own ``mx.fast.scaled_dot_product_attention``."""
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)


def _per_task(x: mx.array, num_tasks: int) -> mx.array:
    """View ``x`` of shape ``(T, ..., d)`` as ``(T, 1, M, d)`` for batched matmul."""
    return x.reshape(num_tasks, 1, math.prod(x.shape[1:-1]), x.shape[-1])


def _bias(bias: mx.array, ndim: int) -> mx.array:
    """Broadcast a ``(d_out,)`` or per-task ``(T, d_out)`` bias against ``ndim`` dims."""
    if bias.ndim == 2:
        return bias.reshape(bias.shape[0], *([1] * (ndim - 2)), bias.shape[1])
    return bias
