"""The fast path for a whole model: every layer whose CPU kernel in stock MLX is slow
swapped, in place, for one on the fused primitives of :mod:`metapeft.ops`.

- ``nn.Linear`` -> :class:`~metapeft.nn.BLASLinear` (BLAS products).
- ``nn.Embedding`` -> :class:`BLASEmbedding`: the lookup is unchanged, and
  ``as_linear`` (a tied output layer, as in SmolLM2, Llama 3.2 and Qwen2.5)
  multiplies on BLAS.
- ``nn.RMSNorm`` -> :func:`metapeft.ops.rms_norm`; ``nn.RoPE`` and mlx-lm's
  ``Llama3RoPE`` -> :func:`metapeft.ops.rope` (an array offset, as a KV cache
  passes, runs MLX's own).
- ``nn.QuantizedLinear`` and ``nn.QuantizedEmbedding.as_linear`` (a quantized tied
  output layer): on the CPU, the weight dequantized, then the BLAS product of
  :func:`metapeft.ops.linear` (for the backward pass the float weight is kept, as a
  float model's is); on a GPU, MLX's own ``quantized_matmul``.
- The attention and MLP blocks of mlx-lm's Llama-family models (``llama``, which
  also serves Mistral, ``qwen2`` and ``qwen3``): :func:`metapeft.ops.attention`
  instead of MLX's CPU fallback of ``mx.fast.scaled_dot_product_attention``, and
  SwiGLU on :func:`metapeft.ops.swiglu`. With a KV cache (generation) they run
  mlx-lm's own code.

Weights are shared with the original layers, never copied; freeze state and
training mode are carried over, and the model computes the same function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from metapeft import ops
from metapeft.nn._modules import bare, carry_state, replace_modules
from metapeft.nn.linear import BLASLinear, use_blas_linear

__all__ = ["BLASEmbedding", "output_layer", "use_fast_layers"]

# mlx-lm model modules whose Attention and MLP classes the fast versions serve.
_MLX_LM_FAMILIES = ("mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3")


class BLASEmbedding(nn.Embedding):
    """``mlx.nn.Embedding`` whose ``as_linear`` (the tied output layer) runs on
    :func:`metapeft.ops.linear`; the lookup is MLX's own.

    Example:
        >>> emb = BLASEmbedding.from_embedding(nn.Embedding(100, 16))
        >>> emb.as_linear(mx.ones((2, 16))).shape
        (2, 100)
    """

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> BLASEmbedding:
        """A ``BLASEmbedding`` sharing the weight of ``embedding``, with its freeze
        state and training mode."""
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(
                f"embedding must be an mlx.nn.Embedding, got {type(embedding).__name__}"
            )
        layer = bare(cls)
        layer.weight = embedding["weight"]
        return carry_state(embedding, layer)

    def as_linear(self, x: mx.array) -> mx.array:
        return ops.linear(x, self["weight"])


def _attention_call(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
    """mlx-lm's Llama-family attention, with :func:`metapeft.ops.attention`."""
    if cache is not None:
        return super(type(self), self).__call__(x, mask=mask, cache=cache)
    B, L, _ = x.shape
    queries = self.q_proj(x).reshape(B, L, self.n_heads, -1)
    keys = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
    values = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1)
    if "q_norm" in self:  # qwen3
        queries, keys = self.q_norm(queries), self.k_norm(keys)
    queries = self.rope(queries.transpose(0, 2, 1, 3))
    keys = self.rope(keys.transpose(0, 2, 1, 3))
    values = values.transpose(0, 2, 1, 3)
    out = ops.attention(queries, keys, values, scale=self.scale, mask=mask)
    return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


def _mlp_call(self, x: mx.array) -> mx.array:
    """mlx-lm's SwiGLU MLP, with :func:`metapeft.ops.swiglu`."""
    return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


def dequantized_weight(layer: nn.Module) -> mx.array:
    """The float weight of an MLX-quantized layer (``weight``, ``scales``, ``biases``)."""
    return mx.dequantize(
        layer["weight"],
        scales=layer["scales"],
        biases=layer.get("biases"),
        group_size=layer.group_size,
        bits=layer.bits,
        mode=layer.mode,
    )


def on_cpu() -> bool:
    """Whether MLX's default device is the CPU (where the fast layers use BLAS)."""
    return mx.default_device() == mx.cpu


def quantized_product(layer: nn.Module, x: mx.array) -> mx.array:
    """``x @ weight.T + bias`` for an MLX-quantized layer (``weight``, ``scales``,
    ``biases``, optional ``bias``): on the CPU the dequantized weight's BLAS product
    (MLX's CPU ``quantized_matmul`` is a naive loop), on a GPU ``quantized_matmul``."""
    if on_cpu():
        return ops.linear(x, dequantized_weight(layer), layer.get("bias"))
    out = mx.quantized_matmul(
        x,
        layer["weight"],
        scales=layer["scales"],
        biases=layer.get("biases"),
        transpose=True,
        group_size=layer.group_size,
        bits=layer.bits,
        mode=layer.mode,
    )
    return out + layer["bias"] if "bias" in layer else out


def _quantized_as_linear(self, x: mx.array) -> mx.array:
    if not on_cpu():
        return super(type(self), self).as_linear(x)
    return ops.linear(x, dequantized_weight(self))


def _rms_norm_call(self, x: mx.array) -> mx.array:
    return ops.rms_norm(x, self["weight"], self.eps)


def _rope_call(self, x: mx.array, offset: Any = 0) -> mx.array:
    if not isinstance(offset, int):
        return super(type(self), self).__call__(x, offset)
    if "_freqs" in self:  # mlx-lm's Llama3RoPE
        return ops.rope(
            x,
            self.dims,
            traditional=self.traditional,
            base=None,
            scale=1.0,
            offset=offset,
            freqs=self["_freqs"],
        )
    return ops.rope(
        x,
        self.dims,
        traditional=self.traditional,
        base=self.base,
        scale=self.scale,
        offset=offset,
    )


# (module of the class, class name) -> the fast ``__call__``: the layers, then the
# blocks that hold them (swapped in that order, each pass over the updated model).
_LAYER_CALLS: dict[tuple[str, str], dict[str, Any]] = {
    ("mlx.nn.layers.normalization", "RMSNorm"): {"__call__": _rms_norm_call},
    ("mlx.nn.layers.positional_encoding", "RoPE"): {"__call__": _rope_call},
    ("mlx_lm.models.rope_utils", "Llama3RoPE"): {"__call__": _rope_call},
    ("mlx.nn.layers.quantized", "QuantizedLinear"): {"__call__": quantized_product},
    ("mlx.nn.layers.quantized", "QuantizedEmbedding"): {"as_linear": _quantized_as_linear},
}
_BLOCK_CALLS: dict[tuple[str, str], dict[str, Any]] = {
    **{(family, "Attention"): {"__call__": _attention_call} for family in _MLX_LM_FAMILIES},
    **{(family, "MLP"): {"__call__": _mlp_call} for family in _MLX_LM_FAMILIES},
}
_FAST_CALLS = {**_LAYER_CALLS, **_BLOCK_CALLS}


@functools.cache
def _fast_class(cls: type) -> type:
    """A subclass of ``cls`` with the fast methods."""
    methods = _FAST_CALLS[(cls.__module__, cls.__name__)]
    return type(f"Fast{cls.__name__}", (cls,), {**methods, "__module__": __name__})


def _class_key(module: nn.Module) -> tuple[str, str]:
    return type(module).__module__, type(module).__name__


def _fast_block(module: nn.Module) -> nn.Module:
    """The module as an instance of its fast subclass, sharing every attribute."""
    fast = bare(_fast_class(type(module)))
    for key, value in module.items():
        fast[key] = value
    fast.__dict__.update({k: v for k, v in module.__dict__.items() if k not in fast.__dict__})
    return carry_state(module, fast)


def use_fast_layers(model: nn.Module) -> nn.Module:
    """Puts ``model`` on metapeft's fast path, in place: see the module docstring
    for what is swapped. Layers already fast and modules of other kinds are left
    alone.

    Args:
        model: Any MLX module (a plain network, or a model from ``mlx_lm.load``).

    Returns:
        ``model`` (or its replacement when ``model`` itself is a swapped layer).

    Example:
        >>> model = use_fast_layers(nn.Sequential(nn.Linear(8, 16), nn.ReLU()))
        >>> type(model.layers[0]).__name__
        'BLASLinear'
    """
    model = use_blas_linear(model)
    named = model.named_modules()
    embeddings = {p for p, m in named if type(m) is nn.Embedding}
    model = replace_modules(model, BLASEmbedding.from_embedding, embeddings)
    for calls in (_LAYER_CALLS, _BLOCK_CALLS):
        paths = {p for p, m in model.named_modules() if _class_key(m) in calls}
        model = replace_modules(model, _fast_block, paths)
    return model


def output_layer(model: nn.Module) -> tuple[Callable[[mx.array], mx.array], mx.array] | None:
    """``(body, weight)`` such that ``model(x)`` is ``body(x) @ weight.T``, for the
    mlx-lm Llama-family models whose output layer is a plain float one (tied
    embeddings, or an ``lm_head`` without bias or adapter); else None. A loss can
    then take the hidden states and the weight (:func:`metapeft.ops.linear_cross_entropy`).

    Example:
        >>> output_layer(nn.Linear(4, 8)) is None
        True
    """
    if type(model).__name__ != "Model" or type(model).__module__ not in _MLX_LM_FAMILIES:
        return None
    tied = model.args.tie_word_embeddings
    head = model.model.embed_tokens if tied else model.lm_head
    plain = (nn.Embedding, BLASEmbedding) if tied else (nn.Linear, BLASLinear)
    if type(head) not in plain or "bias" in head:
        return None
    return model.model, head["weight"]
