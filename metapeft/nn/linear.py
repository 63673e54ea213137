"""``BLASLinear``: ``mlx.nn.Linear`` computed by the fused ``ops.linear`` primitive."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from metapeft import ops
from metapeft.nn._modules import bare, carry_state, replace_modules

__all__ = ["BLASLinear", "use_blas_linear"]


class BLASLinear(nn.Linear):
    """A drop-in ``mlx.nn.Linear`` whose product runs on :func:`metapeft.ops.linear`.

    Same parameters (``weight (d_out, d_in)``, optional ``bias (d_out,)``), same
    initialization, same result dtype (MLX's promotion of the input, weight and bias)
    and the same numbers up to float rounding; only the kernel differs: the
    multithreaded BLAS of ``ops.linear`` (OpenBLAS on Linux, Accelerate on Apple)
    instead of stock MLX's CPU matmul, and one batched product per call for
    per-task weights. It subclasses ``nn.Linear``, so code that looks for Linear
    layers (``isinstance``, mlx-lm's LoRA conversion, quantization) still finds it.

    Per-task weights: a ``(T, d_out, d_in)`` weight (and ``(T, d_out)`` bias) maps
    an input ``(T, ..., d_in)`` task by task, as does ``mx.vmap`` over a task axis of
    the weight.

    Example:
        >>> layer = BLASLinear(16, 4)
        >>> layer(mx.ones((8, 16))).shape
        (8, 4)
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BLASLinear:
        """A ``BLASLinear`` sharing the arrays of ``linear``, with its freeze state
        and training mode. Draws no random numbers.

        Example:
            >>> fast = BLASLinear.from_linear(nn.Linear(16, 4))
            >>> fast.weight.shape
            (4, 16)
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an mlx.nn.Linear, got {type(linear).__name__}")
        layer = bare(cls)
        layer.weight = linear["weight"]
        if "bias" in linear:
            layer.bias = linear["bias"]
        return carry_state(linear, layer)

    def __call__(self, x: mx.array) -> mx.array:
        return ops.linear(x, self["weight"], self.get("bias"))


def use_blas_linear(model: nn.Module) -> nn.Module:
    """Swaps every plain ``mlx.nn.Linear`` of ``model`` for a :class:`BLASLinear`, in place.

    Weights are shared, not copied, so their dtypes are kept; freeze state and
    training mode are carried over. Subclasses of ``nn.Linear`` (which may define
    their own ``__call__``) and quantized layers are left alone.

    Args:
        model: Any MLX module.

    Returns:
        ``model``, or a new ``BLASLinear`` when ``model`` itself is an ``nn.Linear``.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> model = use_blas_linear(model)
        >>> type(model.layers[0]).__name__
        'BLASLinear'
    """
    paths = {p for p, m in model.named_modules() if type(m) is nn.Linear}
    return replace_modules(model, BLASLinear.from_linear, paths)
