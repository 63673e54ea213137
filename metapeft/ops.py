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
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from metapeft import _ext

__all__ = [
    "attention",
    "cross_entropy",
    "linear",
    "linear_cross_entropy",
    "lora_linear",
    "reptile_update",
    "rms_norm",
    "rope",
    "sigmoid",
    "softmax",
    "squared_distance",
    "swiglu",
    "task_sgd",
]

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


def squared_distance(params: Any, other: Any, *, stream: Stream = None) -> mx.array:
    """``sum((params - other) ** 2)`` over every element of every leaf, in one node.

    The squared Euclidean distance between two parameter trees, as a learner reports
    how far the inner loop moved each task. Under ``mx.vmap`` over tasks it stays one
    node, with a leaf of ``other`` shared by the tasks read in place.

    Args:
        params: Tree of arrays.
        other: Tree like ``params``, each leaf of the same shape.
        stream: Stream or device to run on; default stream if None. On a GPU stream
            it is MLX's own ops.

    Returns:
        A float32 scalar (arithmetic in float64 on the CPU).

    Example:
        >>> squared_distance({"w": mx.ones((2, 2))}, {"w": mx.zeros((2, 2))}).item()
        4.0
    """
    try:
        return _ext.squared_distance(params, other, stream=stream)
    except (ValueError, TypeError) as e:
        raise _explain(e, params, other=other) from None


def softmax(
    x: mx.array, scale: float = 1.0, causal: bool = False, *, stream: Stream = None
) -> mx.array:
    """Softmax over the last axis of ``scale * x``, fused and multithreaded on the CPU.

    Args:
        x: ``(..., n)``; with ``causal``, ``(..., L, S)`` attention scores.
        scale: Finite float multiplying ``x`` first.
        causal: Mask query ``i`` from keys ``j > i + S - L`` (queries aligned to
            the last keys, as ``mask="causal"`` in
            ``mx.fast.scaled_dot_product_attention``); masked entries are 0.
        stream: Stream or device to run on; default stream if None.

    Returns:
        Array like ``x`` (same dtype; arithmetic in float32). On a GPU stream it is
        MLX's own ``mx.softmax``.

    Example:
        >>> softmax(mx.zeros((2, 4)))[0, 0].item()
        0.25
    """
    _check_finite("scale", scale)
    return _ext.softmax(x, float(scale), bool(causal), stream=stream)


def cross_entropy(logits: mx.array, targets: mx.array, *, stream: Stream = None) -> mx.array:
    """Per-row cross-entropy ``logsumexp(logits) - logits[target]``, fused.

    One multithreaded pass over the logits; the gradient is ``softmax(logits) -
    onehot(target)`` times the incoming gradient. Masking (padding, prompts) is
    the caller's: multiply the result by a mask.

    Args:
        logits: ``(..., V)``, float32, float16 or bfloat16.
        targets: ``(...)`` class indices of an integer dtype; one outside ``[0, V)``
            gives NaN.
        stream: Stream or device to run on; default stream if None.

    Returns:
        ``(...)`` float32 losses, as ``mlx.nn.losses.cross_entropy(logits, targets,
        reduction="none")``.

    Example:
        >>> round(cross_entropy(mx.zeros((1, 4)), mx.array([2]))[0].item(), 4)
        1.3863
    """
    return _ext.cross_entropy(logits, targets, stream=stream)


def linear_cross_entropy(
    x: mx.array, weight: mx.array, targets: mx.array, *, stream: Stream = None
) -> mx.array:
    """Per-row ``cross_entropy(x @ weight.T, targets)`` without the logits.

    The loss of a language model from its last hidden states ``x`` and its output
    layer ``weight`` (an ``lm_head``, or the tied embeddings). The ``(rows, V)``
    logits are made and consumed a block of vocabulary columns at a time (an online
    softmax), and the gradient with respect to ``x`` is made in the same pass (so
    the forward pass costs two products, the backward pass none): a 49,152-word
    vocabulary over 256 rows holds 16 MB instead of the logits' 50 MB and their
    gradient's 50 MB. The gradient with respect to ``weight``, and second order, hold
    the logits, as the unfused ops do. Masking is the caller's: multiply the result
    by a mask.

    Args:
        x: ``(..., d)``, float32, float16 or bfloat16.
        weight: ``(V, d)``, float32, float16 or bfloat16.
        targets: ``(...)`` class indices of an integer dtype; one outside ``[0, V)``
            gives NaN.
        stream: Stream or device to run on; default stream if None. On a GPU it is
            MLX's own ``matmul`` and a cross-entropy.

    Returns:
        ``(...)`` float32 losses, as ``cross_entropy(linear(x, weight), targets)``.

    Example:
        >>> loss = linear_cross_entropy(mx.ones((1, 2)), mx.zeros((4, 2)), mx.array([0]))
        >>> round(loss[0].item(), 4)
        1.3863
    """
    return _ext.linear_cross_entropy(x, weight, targets, stream=stream)


def sigmoid(x: mx.array, *, stream: Stream = None) -> mx.array:
    """Elementwise ``1 / (1 + exp(-x))``, multithreaded (SiLU is ``x * sigmoid(x)``).

    Example:
        >>> sigmoid(mx.array([0.0])).item()
        0.5
    """
    return _ext.sigmoid(x, stream=stream)


def rms_norm(x: mx.array, weight: mx.array, eps: float, *, stream: Stream = None) -> mx.array:
    """``x / sqrt(mean(x**2) + eps) * weight`` over the last axis, as
    ``mx.fast.rms_norm``, fused and multithreaded in both directions.

    Args:
        x: ``(..., D)``.
        weight: ``(D,)``.
        eps: Finite float ``>= 0``.
        stream: Stream or device to run on; default stream if None.

    Returns:
        Array like ``x``, of the dtype MLX promotes ``x`` and ``weight`` to.

    Example:
        >>> rms_norm(mx.array([[3.0, 4.0]]), mx.ones(2), 0.0)[0, 1].item()
        1.1313708...
    """
    _check_finite("eps", eps)
    return _ext.rms_norm(x, weight, float(eps), stream=stream)


def rope(
    x: mx.array,
    dims: int,
    *,
    traditional: bool,
    base: float | None,
    scale: float,
    offset: int,
    freqs: mx.array | None = None,
    stream: Stream = None,
) -> mx.array:
    """Rotary position embeddings, as ``mx.fast.rope`` with an integer ``offset``.

    Position ``offset + l`` of axis -2 rotates the first ``dims`` features by the
    angles ``(offset + l) * scale / period_i``, where ``period_i = base ** (2i / dims)``
    or ``freqs[i]``; the other features pass through. ``traditional`` pairs
    features ``(2i, 2i + 1)``, else ``(i, i + dims / 2)``. The gradient (with
    respect to ``x``) is the opposite rotation.

    Example:
        >>> x = mx.ones((1, 2, 4))
        >>> rope(x, 4, traditional=False, base=10000.0, scale=1.0, offset=0).shape
        (1, 2, 4)
    """
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    _check_finite("scale", scale)
    if base is not None:
        _check_finite("base", base)
    return _ext.rope(
        x,
        int(dims),
        traditional=bool(traditional),
        base=None if base is None else float(base),
        scale=float(scale),
        offset=offset,
        freqs=freqs,
        stream=stream,
    )


def swiglu(gate: mx.array, up: mx.array, *, stream: Stream = None) -> mx.array:
    """SwiGLU, ``silu(gate) * up``, fused: the activation of Llama-family MLPs.

    The backward pass is one fused kernel that needs only ``gate`` and ``up``, so a
    layer keeps two arrays for it where the composed ops keep four.

    Args:
        gate: Any shape, float32, float16 or bfloat16.
        up: The shape of ``gate``.
        stream: Stream or device to run on; default stream if None.

    Returns:
        Array like ``gate``, of the dtype MLX promotes the two to.

    Example:
        >>> swiglu(mx.array([0.0, 1.0]), mx.array([2.0, 2.0]))[1].item()
        1.4621...
    """
    return _ext.swiglu(gate, up, stream=stream)


def attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    scale: float,
    mask: mx.array | str | None = None,
    *,
    stream: Stream = None,
) -> mx.array:
    """``softmax(scale * queries @ keys.T + mask) @ values``, as
    ``mx.fast.scaled_dot_product_attention``, on the BLAS products of :func:`linear`
    and the fused :func:`softmax`.

    Grouped-query attention needs no copy of the keys and values: the queries of
    a key-value head are stacked into one product. The scores are materialised
    (``B * n_heads * L * S`` floats, kept for the backward pass), which suits the
    short sequences of few-shot tasks; on a GPU stream this is MLX's own fused
    kernel.

    Args:
        queries: ``(B, n_heads, L, D)``.
        keys: ``(B, n_kv_heads, S, D)``, ``n_heads`` a multiple of ``n_kv_heads``.
        values: ``(B, n_kv_heads, S, D_v)``.
        scale: Finite float, usually ``D ** -0.5``.
        mask: None, ``"causal"``, or an array broadcasting to ``(B, n_heads, L, S)``:
            boolean (True keeps) or additive.
        stream: Stream or device to run on; default stream if None.

    Returns:
        ``(B, n_heads, L, D_v)``.

    Example:
        >>> q = mx.ones((1, 4, 3, 8)); kv = mx.ones((1, 2, 3, 8))
        >>> attention(q, kv, kv, scale=8**-0.5, mask="causal").shape
        (1, 4, 3, 8)
    """
    _check_finite("scale", scale)
    if mask is not None and not isinstance(mask, (str, mx.array)):
        raise TypeError(f"mask must be None, 'causal' or an mx.array, got {type(mask).__name__}")
    if isinstance(mask, str) and mask != "causal":
        raise ValueError(f"mask must be None, 'causal' or an mx.array, got {mask!r}")
    if queries.ndim != 4 or keys.ndim != 4 or values.ndim != 4:
        raise ValueError(
            "queries, keys and values must have shape (B, heads, length, head_dim), got "
            f"{queries.shape}, {keys.shape}, {values.shape}"
        )
    B, heads, L, D = queries.shape
    kv_heads, S = keys.shape[1], keys.shape[2]
    if keys.shape[0] != B or values.shape[:3] != keys.shape[:3] or keys.shape[3] != D:
        raise ValueError(
            f"keys {keys.shape} and values {values.shape} do not match queries {queries.shape}"
        )
    if heads % kv_heads:
        raise ValueError(f"n_heads={heads} is not a multiple of n_kv_heads={kv_heads}")
    device = stream if isinstance(stream, mx.Device) else getattr(stream, "device", None)
    if (device or mx.default_device()) == mx.gpu:
        return mx.fast.scaled_dot_product_attention(
            queries, keys, values, scale=scale, mask=mask, stream=stream
        )
    group = heads // kv_heads
    # The `group` query heads of each key-value head form one (group * L)-row product.
    q = queries.reshape(B * kv_heads, group * L, D)
    scores = linear(q, keys.reshape(B * kv_heads, S, D), stream=stream)
    scores = scores.reshape(B, kv_heads, group, L, S)
    if isinstance(mask, mx.array):
        scores = scores.reshape(B, heads, L, S) * scale
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, -mx.inf, stream=stream)
        else:
            scores = scores + mask
        probs = softmax(scores, stream=stream).reshape(B, kv_heads, group, L, S)
    else:
        probs = softmax(scores, scale, causal=mask == "causal", stream=stream)
    v_t = mx.swapaxes(values.reshape(B * kv_heads, S, -1), -1, -2)
    out = linear(probs.reshape(B * kv_heads, group * L, S), v_t, stream=stream)
    return out.reshape(B, heads, L, -1)


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
        if other == keys:
            return ValueError(
                f"{message}: the same leaves {keys}, in other containers (an empty dict or "
                "list on one side only, or a list against a dict)"
            )
        return ValueError(f"{message}: params has leaves {keys}, {name} has {other}")
    leaf = getattr(error, "leaf", None)  # the extension's index of the leaf at fault
    if leaf is None or leaf >= len(keys):
        return error
    return type(error)(message.replace(f"[{leaf}]", f"['{keys[leaf]}']"))
