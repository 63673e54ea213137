"""LoRA layers for MLX models on the fused primitives of :mod:`metapeft.ops`.

- :class:`LoRALinear` (and :class:`QLoRALinear` over a quantized base): a frozen
  linear layer plus a trainable adapter, with mlx-lm's names and shapes; one adapter,
  or one per task (leading axis ``T``). :class:`LoRASpec` holds their settings.
- :class:`BLASLinear` and :func:`use_blas_linear`: ``mlx.nn.Linear`` on the BLAS
  kernel of ``ops.linear``.
- :func:`apply_lora` and :func:`fuse_lora`: convert a model in place, and back
  (:func:`adapt_modules` attaches adapters at given paths, for plain and mlx-lm
  models alike).
- :func:`use_fast_layers`: a whole model (plain or mlx-lm) on the fast path:
  BLAS products, tied output layers, fused attention and SwiGLU.

The trainable adapter tree is MLX's own ``model.trainable_parameters()``.

Example:
    >>> import mlx.nn as nn
    >>> from metapeft.nn import apply_lora
    >>> model = apply_lora(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)))
    >>> from mlx.utils import tree_flatten
    >>> [k for k, _ in tree_flatten(model.trainable_parameters())][:2]
    ['layers.0.lora_a', 'layers.0.lora_b']
"""

from metapeft.nn.fast import BLASEmbedding, use_fast_layers
from metapeft.nn.linear import BLASLinear, use_blas_linear
from metapeft.nn.lora import (
    LoRALinear,
    LoRASpec,
    QLoRALinear,
    adapt_modules,
    apply_lora,
    fuse_lora,
)

__all__ = [
    "BLASEmbedding",
    "BLASLinear",
    "LoRALinear",
    "LoRASpec",
    "QLoRALinear",
    "adapt_modules",
    "apply_lora",
    "fuse_lora",
    "use_blas_linear",
    "use_fast_layers",
]
