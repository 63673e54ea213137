"""mlx-lm models with LoRA adapters: loading with clear errors, and adapters placed
by mlx-lm's own rules (``num_layers`` and ``lora_parameters["keys"]``).

:func:`add_lora` puts a :class:`metapeft.nn.LoRALinear` (or, over a 4-bit base, a
:class:`QLoRALinear`) on the same modules that ``mlx_lm.tuner.utils.linear_to_lora_layers``
converts, so the trainable tree has exactly the names of an mlx-lm adapter file.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from metapeft import ops
from metapeft.nn import LoRALinear, use_fast_layers
from metapeft.nn._modules import bare
from metapeft.nn.fast import quantized_product
from metapeft.nn.lora import check_lora_args

__all__ = ["LoRASpec", "QLoRALinear", "add_lora", "adapter_paths", "load_model"]

# The module types that get adapters (mlx-lm also adapts embeddings and MoE experts).
_LORA_TYPES = (nn.Linear, nn.QuantizedLinear)


@dataclass(frozen=True)
class LoRASpec:
    """Where and how big the adapters are, in mlx-lm's terms.

    Attributes:
        rank: Adapter rank ``r``.
        alpha: LoRA alpha; mlx-lm's ``scale`` is ``alpha / rank``.
        dropout: Dropout on the adapter input.
        keys: Module paths relative to a transformer block (``"self_attn.q_proj"``),
            as mlx-lm's ``lora_parameters["keys"]``; None: every Linear of a block.
        num_layers: Adapt the last ``num_layers`` blocks; ``-1``: all of them.

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
        check_lora_args(self.rank, self.alpha, self.dropout)
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
        """Wraps ``qlinear`` (arrays shared) with a fresh adapter: ``lora_a`` uniform in
        ``±1/sqrt(d_in)``, ``lora_b`` zero."""
        check_lora_args(rank, alpha, dropout)
        if not isinstance(qlinear, nn.QuantizedLinear):
            raise TypeError(f"qlinear must be an nn.QuantizedLinear, got {type(qlinear).__name__}")
        layer = bare(cls)
        for key in ("weight", "scales", "biases", "bias"):
            if key in qlinear:
                layer[key] = qlinear[key]
        layer.group_size, layer.bits, layer.mode = qlinear.group_size, qlinear.bits, qlinear.mode
        d_out = qlinear["scales"].shape[0]
        d_in = qlinear["weight"].shape[1] * 32 // qlinear.bits
        bound = 1.0 / math.sqrt(d_in)
        layer.lora_a = mx.random.uniform(-bound, bound, (d_in, rank))
        layer.lora_b = mx.zeros((rank, d_out))
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


def load_model(path: str | Path) -> tuple[nn.Module, Any, dict[str, Any]]:
    """``mlx_lm.load`` with errors naming the folder: ``(model, tokenizer, config)``.

    Args:
        path: A local folder in mlx-lm's layout (``config.json`` with a supported
            ``model_type``, ``model*.safetensors``, tokenizer files), or a Hugging
            Face repository name (downloaded by mlx-lm when online).

    Raises:
        FileNotFoundError: If ``path`` is an absolute or ``./`` path that does not exist.
        ValueError: If a local folder is not in mlx-lm's layout (the message says
            what is missing), its architecture is not one mlx-lm knows, or a hub
            name cannot be fetched.

    Example:
        >>> model, tokenizer, config = load_model("tiny-llama")
    """
    import mlx_lm

    folder = Path(path)
    if not folder.exists() and (folder.is_absolute() or str(path).startswith(".")):
        raise FileNotFoundError(f"{folder}: no such model folder")
    if folder.exists():
        if not folder.is_dir():
            raise ValueError(f"{folder}: not a model folder (mlx-lm models are directories)")
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{folder}: not an mlx-lm model folder: no config.json")
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file}: not valid JSON ({e})") from None
        if "model_type" not in config:
            raise ValueError(f"{config_file}: no 'model_type': not an mlx-lm model config")
        if not list(folder.glob("model*.safetensors")):
            raise ValueError(
                f"{folder}: not an mlx-lm model folder: no model*.safetensors weights "
                f"(found {sorted(p.name for p in folder.iterdir())})"
            )
        if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
            raise ValueError(f"{folder}: no tokenizer (tokenizer.json or tokenizer.model)")
    try:
        model, tokenizer, config = mlx_lm.load(str(path), return_config=True)
    except Exception as e:  # mlx-lm and the hub client raise many types
        where = "" if folder.exists() else " (not a local folder; tried the Hugging Face hub)"
        raise ValueError(f"{path}: mlx-lm cannot load this model{where}: {e}") from None
    if not hasattr(model, "layers"):
        raise ValueError(f"{path}: the model has no 'layers' (transformer blocks) to adapt")
    return model, tokenizer, config


def adapter_paths(model: nn.Module, spec: LoRASpec) -> dict[str, nn.Module]:
    """The modules mlx-lm would adapt for ``spec``: full dotted path -> module.

    mlx-lm's rule: in each of the last ``num_layers`` blocks of ``model.layers``, the
    modules whose path relative to the block is one of ``keys`` (default: every
    Linear of any block); then top-level modules whose full path is in ``keys``.

    Raises:
        ValueError: If ``num_layers`` exceeds the blocks, a key matches no module
            (the message lists the Linear modules of a block), or a matched module
            is neither Linear nor QuantizedLinear (named).
    """
    blocks = list(model.layers)
    prefix = _blocks_prefix(model)
    if spec.num_layers > len(blocks):
        raise ValueError(
            f"num_layers={spec.num_layers} but the model has {len(blocks)} transformer blocks"
        )
    keys = spec.keys
    if keys is None:
        keys = tuple(
            sorted({p for b in blocks for p, m in b.named_modules() if isinstance(m, _LORA_TYPES)})
        )
    first = len(blocks) - (len(blocks) if spec.num_layers == -1 else spec.num_layers)
    chosen: dict[str, nn.Module] = {}
    matched: set[str] = set()
    for i in range(first, len(blocks)):
        for rel, module in blocks[i].named_modules():
            if rel in keys:
                chosen[f"{prefix}{i}.{rel}"] = module
                matched.add(rel)
    for path, module in model.named_modules():
        if path in keys:
            chosen[path] = module
            matched.add(path)
    unused = [k for k in keys if k not in matched] if spec.keys is not None else []
    if unused or not chosen:
        linear = sorted(p for p, m in blocks[-1].named_modules() if isinstance(m, _LORA_TYPES))
        raise ValueError(
            f"target modules {unused or list(keys)} match no module of the adapted blocks; "
            f"a block's Linear modules are: {', '.join(linear)}"
        )
    bad = [f"{p} ({type(m).__name__})" for p, m in chosen.items() if not isinstance(m, _LORA_TYPES)]
    if bad:
        raise ValueError(
            f"LoRA applies to Linear and QuantizedLinear modules only; not to {', '.join(bad)}"
        )
    return chosen


def _blocks_prefix(model: nn.Module) -> str:
    """The dotted path of ``model.layers`` followed by a dot (``"model.layers."``)."""
    first = model.layers[0]
    for path, module in model.named_modules():
        if module is first:
            return path[: -len("0")]
    raise ValueError("cannot find the path of model.layers among the model's modules")


def add_lora(model: nn.Module, spec: LoRASpec, fast: bool = True) -> nn.Module:
    """Adds fresh adapters to an mlx-lm model in place, where mlx-lm would put them,
    and freezes everything else.

    Linear modules become :class:`metapeft.nn.LoRALinear`, quantized ones
    :class:`QLoRALinear`; ``model.trainable_parameters()`` is then the adapter tree,
    with the names of mlx-lm's ``adapters.safetensors``. With ``fast`` the rest of
    the model goes on metapeft's fast path (:func:`metapeft.nn.use_fast_layers`).

    Args:
        model: A model from ``mlx_lm.load`` (it has ``model.layers``).
        spec: Rank, alpha, dropout, keys and number of blocks.
        fast: Swap the other layers for metapeft's fast ones (same results).

    Returns:
        ``model``.

    Example:
        >>> model, tokenizer, _ = load_model("tiny-llama")
        >>> model = add_lora(model, LoRASpec(rank=4, keys=("self_attn.q_proj",)))
    """
    chosen = adapter_paths(model, spec)
    swaps = []
    for path, module in chosen.items():
        cls = QLoRALinear if isinstance(module, nn.QuantizedLinear) else LoRALinear
        swaps.append((path, cls.from_base(module, spec.rank, spec.alpha, spec.dropout)))
    model.update_modules(tree_unflatten(swaps))
    model.freeze()
    for module in model.modules():
        if isinstance(module, (LoRALinear, QLoRALinear)):
            module.unfreeze(recurse=False, keys=["lora_a", "lora_b"])
    if fast:
        use_fast_layers(model)
    return model


def is_quantized(model: nn.Module) -> bool:
    """Whether any module of ``model`` is quantized (then meta-learners loop over tasks)."""
    return any(
        isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding, QLoRALinear))
        for m in model.modules()
    )
