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

import mlx.core as mx
import mlx.nn as nn

from metapeft import ops
from metapeft.nn._modules import bare, carry_state, replace_modules
from metapeft.nn.linear import use_blas_linear

__all__ = ["LoRALinear", "apply_lora", "fuse_lora"]


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
        check_lora_args(rank, alpha, dropout)
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
        check_lora_args(rank, alpha, dropout)
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
        bound = 1.0 / math.sqrt(d_in)
        self._set(
            weight=linear["weight"],
            bias=linear.get("bias"),
            lora_a=mx.random.uniform(low=-bound, high=bound, shape=(d_in, rank)),
            lora_b=mx.zeros((rank, d_out)),
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
        if self.num_tasks is not None:
            raise ValueError(
                f"fuse needs a single adapter, but this layer has num_tasks={self.num_tasks}; "
                "select one task's adapter (e.g. layer.update({'lora_a': a[t], 'lora_b': b[t]}))"
            )
        weight = self["weight"]
        # (lora_a @ lora_b).T == lora_b.T @ lora_a.T == ops.linear(lora_b.T, lora_a)
        delta = ops.linear(self["lora_b"].T, self["lora_a"])
        fused = bare(nn.Linear)
        fused.weight = (weight.astype(mx.float32) + self.scale * delta).astype(weight.dtype)
        if "bias" in self:
            fused.bias = self["bias"]
        return carry_state(self, fused)


def _base(x: mx.array, weight: mx.array, bias: mx.array | None) -> mx.array:
    """``ops.linear`` for the base of a layer whose per-task bias ``(T, d_out)`` may go
    with a weight shared by the tasks (ops.linear then wants the weight per task)."""
    if bias is not None and bias.ndim == 2 and weight.ndim == 2:
        weight = mx.broadcast_to(weight, (bias.shape[0], *weight.shape))
    return ops.linear(x, weight, bias)


def check_lora_args(rank: int, alpha: float, dropout: float) -> None:
    """Raises ``TypeError``/``ValueError`` naming the argument unless ``rank >= 1`` is an
    int, ``alpha > 0`` is finite and ``0 <= dropout < 1``."""
    if not isinstance(rank, numbers.Integral) or isinstance(rank, bool):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    for name, value in (("alpha", alpha), ("dropout", dropout)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be finite and > 0, got {alpha}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


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
    """Turns ``model`` into a LoRA model in place: adapters on the chosen Linear layers,
    everything else frozen.

    1. Each ``mlx.nn.Linear`` (or subclass) whose dotted path, as in
       ``model.named_modules()``, matches ``target_modules`` becomes a
       :class:`LoRALinear` built by :meth:`LoRALinear.from_base`.
    2. The model is frozen except for ``lora_a`` and ``lora_b`` of the LoRA layers,
       so ``model.trainable_parameters()`` is the adapter tree (the one to save with
       ``mx.save_safetensors(dict(tree_flatten(...)))``).
    3. With ``blas_linear``, every remaining plain ``nn.Linear`` becomes a
       :class:`~metapeft.nn.BLASLinear` (see :func:`use_blas_linear`).

    Args:
        model: Any MLX module.
        rank: Adapter rank, ``>= 1``.
        alpha: LoRA alpha, ``> 0``; ``scale = alpha / rank``.
        dropout: Dropout probability on the adapter input, in ``[0, 1)``.
        target_modules: ``None`` for every Linear layer, or names as in mlx-lm's
            ``keys``: a layer matches when its path equals an entry or ends with
            ``"." + entry`` (``"self_attn.q_proj"`` and ``"q_proj"`` both match
            ``"layers.0.self_attn.q_proj"``; ``"proj"`` does not). A single string is
            one entry. Entries that match nothing are ignored as long as one matches.
        blas_linear: Whether to swap the other Linear layers for ``BLASLinear``.
            Quantized layers are never adapted nor swapped (they are frozen).

    Returns:
        ``model`` (a new ``LoRALinear`` when ``model`` itself is an ``nn.Linear``).

    Raises:
        ValueError: If ``target_modules`` matches no Linear layer, or ``rank``,
            ``alpha`` or ``dropout`` is out of range. Nothing is modified then.

    Example:
        >>> from mlx.utils import tree_flatten
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> model = apply_lora(model, rank=4, target_modules=["layers.2"])
        >>> sorted(k for k, _ in tree_flatten(model.trainable_parameters()))
        ['layers.2.lora_a', 'layers.2.lora_b']
    """
    check_lora_args(rank, alpha, dropout)
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    named = model.named_modules()
    linear = [p for p, m in named if isinstance(m, nn.Linear)]
    if target_modules is None:
        paths = set(linear)
        if not paths:
            raise ValueError("the model has no mlx.nn.Linear layer to adapt")
    else:
        patterns = list(target_modules)
        bad = [p for p in patterns if not isinstance(p, str) or not p]
        if bad:
            raise TypeError(f"target_modules must be non-empty strings, got {bad!r}")
        paths = {p for p in linear if _matches(p, patterns)}
        if not paths:
            raise ValueError(_no_match_message(patterns, named, linear))

    model = replace_modules(
        model, lambda m: LoRALinear.from_base(m, rank=rank, alpha=alpha, dropout=dropout), paths
    )
    model.freeze()
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.unfreeze(recurse=False, keys=["lora_a", "lora_b"])
    if blas_linear:
        model = use_blas_linear(model)
    return model


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


def fuse_lora(model: nn.Module) -> nn.Module:
    """Replaces, in place, every :class:`LoRALinear` of ``model`` by its fused
    ``nn.Linear`` (:meth:`LoRALinear.fuse`).

    Args:
        model: A model holding single-adapter ``LoRALinear`` layers.

    Returns:
        ``model`` (the fused ``nn.Linear`` when ``model`` itself is a ``LoRALinear``).

    Example:
        >>> model = apply_lora(nn.Sequential(nn.Linear(8, 2)), rank=2)
        >>> type(fuse_lora(model).layers[0]).__name__
        'Linear'
    """
    paths = {p for p, m in model.named_modules() if isinstance(m, LoRALinear)}
    return replace_modules(model, lambda m: m.fuse(), paths)
