"""LoRA layers on the fused primitives: :class:`LoRALinear` (one adapter, or one
adapter per task), :func:`apply_lora` and :func:`fuse_lora`.

Names and shapes follow mlx-lm (``lora_a (d_in, r)``, ``lora_b (r, d_out)``), so
an adapter tree exported from here loads into mlx-lm without renaming.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from metapeft import ops
from metapeft.nn._modules import bare, carry_state, replace_modules
from metapeft.nn.fast import dequantized_weight, quantized_product, use_fast_layers

__all__ = ["LoRALinear", "LoRASpec", "QLoRALinear", "adapt_modules", "apply_lora", "fuse_lora"]


@dataclass(frozen=True)
class LoRASpec:
    """How big the adapters are and where they go, in mlx-lm's terms: the one spec of
    :func:`apply_lora`, :func:`metapeft.lm.add_lora` and adapter files.

    Attributes:
        rank: Adapter rank ``r >= 1``.
        alpha: LoRA alpha, finite and ``> 0``; mlx-lm's ``scale`` is ``alpha / rank``.
        dropout: Dropout on the adapter input, in ``[0, 1)``.
        keys: Which modules: for an mlx-lm model, paths relative to a transformer
            block (``"self_attn.q_proj"``, mlx-lm's ``lora_parameters["keys"]``); for
            :func:`apply_lora`, path suffixes (``"layers.0"``). None: every Linear.
        num_layers: For an mlx-lm model, adapt the last ``num_layers`` blocks;
            ``-1``: all of them.

    Example:
        >>> LoRASpec(rank=8, alpha=16.0).lora_parameters()["scale"]
        2.0
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    keys: tuple[str, ...] | None = None
    num_layers: int = -1

    def __post_init__(self) -> None:
        if not isinstance(self.rank, numbers.Integral) or isinstance(self.rank, bool):
            raise TypeError(f"rank must be an int, got {type(self.rank).__name__}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        for name, value in (("alpha", self.alpha), ("dropout", self.dropout)):
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be finite and > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.keys is not None:
            keys = (self.keys,) if isinstance(self.keys, str) else tuple(self.keys)
            if not keys or any(not isinstance(k, str) or not k for k in keys):
                raise ValueError(f"keys must be non-empty module names, got {self.keys!r}")
            object.__setattr__(self, "keys", keys)
        if not isinstance(self.num_layers, int) or self.num_layers == 0 or self.num_layers < -1:
            raise ValueError(f"num_layers must be >= 1 or -1 (all), got {self.num_layers!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def lora_parameters(self) -> dict[str, Any]:
        """mlx-lm's ``lora_parameters`` (``rank``, ``scale``, ``dropout``, ``keys`` if set)."""
        params: dict[str, Any] = {"rank": self.rank, "scale": self.scale, "dropout": self.dropout}
        if self.keys is not None:
            params["keys"] = list(self.keys)
        return params

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["keys"] = None if self.keys is None else list(self.keys)
        return d

    @classmethod
    def from_adapter_config(cls, config: dict[str, Any], source: str | Path) -> LoRASpec:
        """The spec of an mlx-lm ``adapter_config.json`` (already parsed); ``source``
        names the file in errors."""
        if config.get("fine_tune_type", "lora") != "lora":
            raise ValueError(
                f"{source}: fine_tune_type {config.get('fine_tune_type')!r} is not supported "
                "(only 'lora' adapters)"
            )
        params = config.get("lora_parameters")
        if not isinstance(params, dict) or "rank" not in params or "scale" not in params:
            raise ValueError(f"{source}: lora_parameters with 'rank' and 'scale' are missing")
        rank = int(params["rank"])
        try:
            return cls(
                rank=rank,
                alpha=float(params["scale"]) * rank,
                dropout=float(params.get("dropout", 0.0)),
                keys=params.get("keys"),
                num_layers=int(config.get("num_layers", -1)),
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update, as in mlx-lm.

    ``y = x @ weight.T + bias + scale * (dropout(x) @ lora_a) @ lora_b`` with
    ``scale = alpha / rank``. The base ``weight (d_out, d_in)`` and optional
    ``bias (d_out,)`` sit on the layer itself, as in ``mlx.nn.Linear`` (so a model's
    base parameters keep their paths), and are frozen; ``lora_a (d_in, r)`` and
    ``lora_b (r, d_out)`` are trainable. ``lora_a`` is drawn from
    ``U(-1/sqrt(d_in), 1/sqrt(d_in))`` and ``lora_b`` is zero, so a fresh adapter
    gives exactly the base layer's output. Adapters are float32 whatever the base
    dtype, as in mlx-lm.

    Computation: without dropout (``dropout == 0`` or evaluation mode) the layer
    is one fused :func:`metapeft.ops.lora_linear` call. With dropout in training
    mode the base and the adapter see different inputs, so it is
    ``ops.linear(x, weight, bias) + scale * ops.linear(ops.linear(dropout(x),
    lora_a.T), lora_b.T)``: three BLAS products, still never a ``(d_out, d_in)``
    update. Products accumulate in float32; the result has the dtype that
    ``mlx.nn.Linear`` would give (MLX's promotion of ``x``, ``weight`` and
    ``bias``), rounded once.

    Per-task adapters: the same class takes ``lora_a (T, d_in, r)`` and
    ``lora_b (T, r, d_out)`` (see :meth:`with_tasks`, or ``module.update`` with a
    parameter tree whose adapters carry a leading task axis). The input is then
    ``(T, ..., d_in)`` and task ``t`` uses adapter ``t``; the base stays shared (a
    per-task ``weight (T, d_out, d_in)`` also works). Under ``mx.vmap`` over a task
    axis, a single-adapter layer gives the same numbers as the per-task form. Under
    ``mx.vmap`` dropout draws one mask shared by the mapped tasks (MLX's random ops
    are not batched); the per-task form draws an independent mask per task.

    Args:
        input_dims: ``d_in``.
        output_dims: ``d_out``.
        rank: ``r >= 1``.
        alpha: LoRA alpha (``> 0``); ``scale = alpha / rank``. mlx-lm's configs give
            ``scale`` directly: use ``alpha = scale * rank``.
        dropout: Dropout probability on the adapter input, in ``[0, 1)``.
        bias: Whether the base layer has a bias (as ``mlx.nn.Linear``).

    Example:
        >>> layer = LoRALinear.from_base(nn.Linear(16, 4), rank=2, alpha=4.0)
        >>> layer(mx.ones((8, 16))).shape
        (8, 4)
        >>> from mlx.utils import tree_flatten
        >>> [k for k, _ in tree_flatten(layer.trainable_parameters())]
        ['lora_a', 'lora_b']
    """

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        LoRASpec(rank, alpha, dropout)  # checks the settings
        base = nn.Linear(input_dims, output_dims, bias=bias)
        self._attach(base, rank, alpha, dropout)

    @classmethod
    def from_base(
        cls, linear: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0
    ) -> LoRALinear:
        """Wraps ``linear`` (its arrays are shared, not copied) with a fresh adapter.

        Args:
            linear: An ``mlx.nn.Linear`` (or subclass) with a 2-D weight.
            rank: ``r >= 1``.
            alpha: LoRA alpha (``> 0``); ``scale = alpha / rank``.
            dropout: Dropout probability on the adapter input, in ``[0, 1)``.

        Returns:
            A ``LoRALinear`` with the base frozen, in ``linear``'s training mode.

        Example:
            >>> layer = LoRALinear.from_base(nn.Linear(16, 4), rank=4)
            >>> layer.lora_a.shape, layer.lora_b.shape
            ((16, 4), (4, 4))
        """
        LoRASpec(rank, alpha, dropout)  # checks the settings
        if not isinstance(linear, nn.Linear):
            hint = " (dequantize it first)" if isinstance(linear, nn.QuantizedLinear) else ""
            raise TypeError(f"linear must be an mlx.nn.Linear, got {type(linear).__name__}{hint}")
        if linear["weight"].ndim != 2:
            raise ValueError(
                f"linear.weight must have shape (d_out, d_in), got {linear['weight'].shape}"
            )
        layer = bare(cls)
        layer._attach(linear, rank, alpha, dropout)
        return layer

    def _attach(self, linear: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        """Takes the base arrays of ``linear`` and draws a fresh adapter."""
        d_out, d_in = linear["weight"].shape
        lora_a, lora_b = _fresh_adapter(d_in, d_out, rank)
        self._set(
            weight=linear["weight"],
            bias=linear.get("bias"),
            lora_a=lora_a,
            lora_b=lora_b,
            scale=alpha / rank,
            dropout=nn.Dropout(p=dropout),
        )
        self.train(linear.training)

    def _set(
        self,
        weight: mx.array,
        bias: mx.array | None,
        lora_a: mx.array,
        lora_b: mx.array,
        scale: float,
        dropout: nn.Dropout,
    ) -> None:
        self.weight = weight
        if bias is not None:
            self.bias = bias
        self.dropout = dropout
        self.scale = float(scale)
        self.lora_a = lora_a
        self.lora_b = lora_b
        self.freeze(recurse=False, keys=["weight"] + (["bias"] if bias is not None else []))

    @property
    def input_dims(self) -> int:
        return self["weight"].shape[-1]

    @property
    def output_dims(self) -> int:
        return self["weight"].shape[-2]

    @property
    def rank(self) -> int:
        return self["lora_a"].shape[-1]

    @property
    def num_tasks(self) -> int | None:
        """``T`` for per-task adapters, ``None`` for a single adapter."""
        return self["lora_a"].shape[0] if self["lora_a"].ndim == 3 else None

    def _extra_repr(self) -> str:
        tasks = "" if self.num_tasks is None else f", num_tasks={self.num_tasks}"
        return (
            f"input_dims={self.input_dims}, output_dims={self.output_dims}, "
            f"rank={self.rank}, scale={self.scale:g}, bias={'bias' in self}{tasks}"
        )

    def __call__(self, x: mx.array) -> mx.array:
        weight, bias = self["weight"], self.get("bias")
        lora_a, lora_b = self["lora_a"], self["lora_b"]
        dropped = self.dropout(x)
        if dropped is x:  # nn.Dropout hands x back when p == 0 or not training
            out = ops.lora_linear(x, weight, lora_a, lora_b, self.scale, bias)
        else:
            low = ops.linear(dropped, mx.swapaxes(lora_a, -1, -2))
            low = ops.linear(low, mx.swapaxes(lora_b, -1, -2))
            out = _base(x, weight, bias) + self.scale * low
        dtype = mx.result_type(*(a for a in (x, weight, bias) if a is not None))
        return out if out.dtype == dtype else out.astype(dtype)

    def with_tasks(self, num_tasks: int) -> LoRALinear:
        """A copy with ``num_tasks`` copies of the adapter, ``lora_a (T, d_in, r)``
        and ``lora_b (T, r, d_out)``, each equal to this one.

        The base arrays are shared; freeze state and training mode are kept. The
        copies are broadcast views until a task updates them.

        Args:
            num_tasks: ``T >= 1``.

        Returns:
            A per-task ``LoRALinear``, called with inputs ``(T, ..., d_in)``.

        Example:
            >>> layer = LoRALinear.from_base(nn.Linear(16, 4), rank=2).with_tasks(5)
            >>> layer(mx.ones((5, 8, 16))).shape
            (5, 8, 4)
        """
        if not isinstance(num_tasks, numbers.Integral) or isinstance(num_tasks, bool):
            raise TypeError(f"num_tasks must be an int, got {type(num_tasks).__name__}")
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        if self.num_tasks is not None:
            raise ValueError(f"the adapters are already per task (num_tasks={self.num_tasks})")
        lora_a, lora_b = self["lora_a"], self["lora_b"]
        layer = bare(type(self))
        layer._set(
            weight=self["weight"],
            bias=self.get("bias"),
            lora_a=mx.broadcast_to(lora_a, (int(num_tasks), *lora_a.shape)),
            lora_b=mx.broadcast_to(lora_b, (int(num_tasks), *lora_b.shape)),
            scale=self.scale,
            dropout=copy.deepcopy(self.dropout),
        )
        layer.unfreeze(recurse=False)
        return carry_state(self, layer)

    def fuse(self) -> nn.Linear:
        """The ``mlx.nn.Linear`` computing the same map: weight
        ``weight + scale * (lora_a @ lora_b).T``, summed in float32 and rounded once
        to the weight's dtype, and the same bias.

        The new layer keeps this layer's training mode, and its weight and bias are
        frozen as the base was.

        Returns:
            A new ``nn.Linear``.

        Example:
            >>> layer = LoRALinear.from_base(nn.Linear(16, 4))
            >>> layer.fuse().weight.shape
            (4, 16)
        """
        weight = self["weight"]
        fused = bare(nn.Linear)
        fused.weight = (weight.astype(mx.float32) + _adapter_delta(self)).astype(weight.dtype)
        if "bias" in self:
            fused.bias = self["bias"]
        return carry_state(self, fused)


class QLoRALinear(nn.Module):
    """A frozen quantized linear layer plus a trainable low-rank update (QLoRA).

    The base keeps the arrays of ``mlx.nn.QuantizedLinear`` (``weight``, ``scales``,
    ``biases``, optional ``bias``) under the same names, so the model's base
    parameters keep their paths; ``lora_a (d_in, r)`` and ``lora_b (r, d_out)`` are
    float32, as in :class:`metapeft.nn.LoRALinear` and mlx-lm. Per-task adapters
    (a leading axis ``T``) take inputs ``(T, ..., d_in)``.

    On the CPU the base product is the dequantized weight's BLAS product (MLX's CPU
    ``quantized_matmul`` is a naive loop); on a GPU it is ``quantized_matmul``. MLX
    0.32 has no ``vmap`` rule for quantized products, so meta-learners run a quantized
    model with ``batched=False`` (tasks one at a time).

    Example:
        >>> base = nn.QuantizedLinear(64, 32, group_size=32, bits=4)
        >>> QLoRALinear.from_base(base, rank=4)(mx.ones((2, 64))).shape
        (2, 32)
    """

    @classmethod
    def from_base(
        cls, qlinear: nn.QuantizedLinear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0
    ) -> QLoRALinear:
        """Wraps ``qlinear`` (arrays shared) with a fresh adapter, drawn as
        :class:`LoRALinear`'s."""
        LoRASpec(rank, alpha, dropout)  # checks the settings
        if not isinstance(qlinear, nn.QuantizedLinear):
            raise TypeError(f"qlinear must be an nn.QuantizedLinear, got {type(qlinear).__name__}")
        layer = bare(cls)
        for key in ("weight", "scales", "biases", "bias"):
            if key in qlinear:
                layer[key] = qlinear[key]
        layer.group_size, layer.bits, layer.mode = qlinear.group_size, qlinear.bits, qlinear.mode
        d_out = qlinear["scales"].shape[0]
        d_in = qlinear["weight"].shape[1] * 32 // qlinear.bits
        layer.lora_a, layer.lora_b = _fresh_adapter(d_in, d_out, rank)
        layer.scale = alpha / rank
        layer.dropout = nn.Dropout(p=dropout)
        layer.freeze(
            recurse=False, keys=[k for k in ("weight", "scales", "biases", "bias") if k in layer]
        )
        layer.train(qlinear.training)
        return layer

    def __call__(self, x: mx.array) -> mx.array:
        out = quantized_product(self, x)
        low = ops.linear(self.dropout(x), mx.swapaxes(self["lora_a"], -1, -2))
        low = ops.linear(low, mx.swapaxes(self["lora_b"], -1, -2))
        return out + (self.scale * low).astype(out.dtype)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """The layer computing the same map with the adapter merged: the weight
        dequantized, ``scale * (lora_a @ lora_b).T`` added in float32, then quantized
        again as before (``nn.QuantizedLinear``, rounding the sum to its groups, as
        mlx-lm's fuse does) or, with ``dequantize``, kept as an ``nn.Linear``.

        Example:
            >>> layer = QLoRALinear.from_base(nn.QuantizedLinear(64, 32, group_size=32, bits=4))
            >>> type(layer.fuse()).__name__, type(layer.fuse(dequantize=True)).__name__
            ('QuantizedLinear', 'Linear')
        """
        fused = bare(nn.Linear)
        fused.weight = dequantized_weight(self) + _adapter_delta(self)
        if "bias" in self:
            fused.bias = self["bias"]
        if not dequantize:
            fused = nn.QuantizedLinear.from_linear(fused, self.group_size, self.bits, self.mode)
        return carry_state(self, fused)


def _base(x: mx.array, weight: mx.array, bias: mx.array | None) -> mx.array:
    """``ops.linear`` for the base of a layer whose per-task bias ``(T, d_out)`` may go
    with a weight shared by the tasks (ops.linear then wants the weight per task)."""
    if bias is not None and bias.ndim == 2 and weight.ndim == 2:
        weight = mx.broadcast_to(weight, (bias.shape[0], *weight.shape))
    return ops.linear(x, weight, bias)


def _fresh_adapter(d_in: int, d_out: int, rank: int) -> tuple[mx.array, mx.array]:
    """A fresh adapter, as mlx-lm draws it: ``lora_a (d_in, r)`` uniform in
    ``±1/sqrt(d_in)``, ``lora_b (r, d_out)`` zero (so the layer starts as its base)."""
    bound = 1.0 / math.sqrt(d_in)
    return mx.random.uniform(-bound, bound, (d_in, rank)), mx.zeros((rank, d_out))


def _adapter_delta(layer: nn.Module) -> mx.array:
    """``scale * (lora_a @ lora_b).T``, the ``(d_out, d_in)`` float32 update a single
    adapter adds to its base weight."""
    if layer["lora_a"].ndim != 2:
        raise ValueError(
            f"fuse needs a single adapter, but this layer has "
            f"num_tasks={layer['lora_a'].shape[0]}; "
            "select one task's adapter (e.g. layer.update({'lora_a': a[t], 'lora_b': b[t]}))"
        )
    # (lora_a @ lora_b).T == lora_b.T @ lora_a.T == ops.linear(lora_b.T, lora_a)
    return layer.scale * ops.linear(layer["lora_b"].T, layer["lora_a"])


# The layers adapters go on.
_ADAPTABLE = (nn.Linear, nn.QuantizedLinear)


def _matches(path: str, patterns: Sequence[str]) -> bool:
    """mlx-lm's ``keys`` rule: the path equals a pattern or ends with ``"." + pattern``."""
    return any(path == p or path.endswith("." + p) for p in patterns)


def apply_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules: Sequence[str] | str | None = None,
    blas_linear: bool = True,
) -> nn.Module:
    """Turns ``model`` into a LoRA model in place: adapters on the chosen linear layers,
    everything else frozen.

    1. Each ``mlx.nn.Linear`` (or subclass) or ``mlx.nn.QuantizedLinear`` whose dotted
       path, as in ``model.named_modules()``, matches ``target_modules`` gets an
       adapter (:func:`adapt_modules`: a :class:`LoRALinear`, or a
       :class:`QLoRALinear` over a quantized layer).
    2. The model is frozen except for ``lora_a`` and ``lora_b`` of the LoRA layers,
       so ``model.trainable_parameters()`` is the adapter tree (the one to save with
       ``mx.save_safetensors(dict(tree_flatten(...)))``).
    3. With ``blas_linear``, the rest of the model goes on metapeft's fast path
       (:func:`~metapeft.nn.use_fast_layers`).

    For an mlx-lm model, :func:`metapeft.lm.add_lora` picks the modules by mlx-lm's
    rule (keys inside the last ``num_layers`` blocks) and attaches them the same way.

    Args:
        model: Any MLX module.
        rank: Adapter rank, ``>= 1``.
        alpha: LoRA alpha, ``> 0``; ``scale = alpha / rank``.
        dropout: Dropout probability on the adapter input, in ``[0, 1)``.
        target_modules: ``None`` for every linear layer, or names as in mlx-lm's
            ``keys``: a layer matches when its path equals an entry or ends with
            ``"." + entry`` (``"self_attn.q_proj"`` and ``"q_proj"`` both match
            ``"layers.0.self_attn.q_proj"``; ``"proj"`` does not). A single string is
            one entry. Entries that match nothing are ignored as long as one matches.
        blas_linear: Whether to put the other layers on the fast path.

    Returns:
        ``model`` (a new ``LoRALinear`` when ``model`` itself is an ``nn.Linear``).

    Raises:
        ValueError: If ``target_modules`` matches no linear layer, or ``rank``,
            ``alpha`` or ``dropout`` is out of range. Nothing is modified then.

    Example:
        >>> from mlx.utils import tree_flatten
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> model = apply_lora(model, rank=4, target_modules=["layers.2"])
        >>> sorted(k for k, _ in tree_flatten(model.trainable_parameters()))
        ['layers.2.lora_a', 'layers.2.lora_b']
    """
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    keys = None if target_modules is None else tuple(target_modules)
    if keys is not None:
        bad = [p for p in keys if not isinstance(p, str) or not p]
        if bad:
            raise TypeError(f"target_modules must be non-empty strings, got {bad!r}")
    spec = LoRASpec(rank, alpha, dropout)
    named = model.named_modules()
    linear = [p for p, m in named if isinstance(m, _ADAPTABLE)]
    if keys is None:
        paths = set(linear)
        if not paths:
            raise ValueError("the model has no mlx.nn.Linear or QuantizedLinear layer to adapt")
    else:
        paths = {p for p in linear if _matches(p, keys)}
        if not paths:
            raise ValueError(_no_match_message(list(keys), named, linear))
    return adapt_modules(model, paths, spec, fast=blas_linear)


def adapt_modules(
    model: nn.Module, paths: set[str], spec: LoRASpec, fast: bool = True
) -> nn.Module:
    """Puts a fresh adapter of ``spec`` on each module of ``model`` at ``paths`` (a
    :class:`LoRALinear` over an ``nn.Linear``, a :class:`QLoRALinear` over an
    ``nn.QuantizedLinear``), freezes everything but the adapters and, with ``fast``,
    puts the rest on the fast path; in place. The one place adapters are attached:
    :func:`apply_lora` and :func:`metapeft.lm.add_lora` choose the paths.

    Returns:
        ``model`` (the new layer when ``model`` itself is adapted).
    """

    def adapted(module: nn.Module) -> nn.Module:
        cls = QLoRALinear if isinstance(module, nn.QuantizedLinear) else LoRALinear
        return cls.from_base(module, spec.rank, spec.alpha, spec.dropout)

    model = replace_modules(model, adapted, paths)
    model.freeze()
    for module in model.modules():
        if isinstance(module, (LoRALinear, QLoRALinear)):
            module.unfreeze(recurse=False, keys=["lora_a", "lora_b"])
    return use_fast_layers(model) if fast else model


def _no_match_message(
    patterns: list[str], named: list[tuple[str, nn.Module]], linear: list[str]
) -> str:
    linear = sorted(linear)
    shown = ", ".join(linear[:12]) + (f", ... ({len(linear)} in all)" if len(linear) > 12 else "")
    msg = f"target_modules {patterns} matched no mlx.nn.Linear layer; "
    msg += f"the Linear layers are: {shown}" if linear else "the model has no Linear layer"
    others = sorted(f"{p} ({type(m).__name__})" for p, m in named if p and _matches(p, patterns))
    if others:
        msg += f"; matched modules that are not nn.Linear: {', '.join(others[:12])}"
    return msg


def fuse_lora(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Replaces, in place, every :class:`LoRALinear` and :class:`QLoRALinear` of
    ``model`` by its fused layer (:meth:`LoRALinear.fuse`, :meth:`QLoRALinear.fuse`;
    ``dequantize`` as the latter's).

    Args:
        model: A model holding single-adapter LoRA layers.
        dequantize: Fused quantized layers become ``nn.Linear`` instead of being
            quantized again.

    Returns:
        ``model`` (the fused layer when ``model`` itself is a LoRA layer).

    Example:
        >>> model = apply_lora(nn.Sequential(nn.Linear(8, 2)), rank=2)
        >>> type(fuse_lora(model).layers[0]).__name__
        'Linear'
    """

    def fused(module: nn.Module) -> nn.Module:
        return module.fuse(dequantize) if isinstance(module, QLoRALinear) else module.fuse()

    paths = {p for p, m in model.named_modules() if isinstance(m, (LoRALinear, QLoRALinear))}
    return replace_modules(model, fused, paths)
