"""mlx-lm models with LoRA adapters: loading with clear errors, and adapters placed
by mlx-lm's own rules (``num_layers`` and ``lora_parameters["keys"]``).

:func:`add_lora` puts a :class:`metapeft.nn.LoRALinear` (or, over a 4-bit base, a
:class:`metapeft.nn.QLoRALinear`) on the same modules that
``mlx_lm.tuner.utils.linear_to_lora_layers`` converts, so the trainable tree has
exactly the names of an mlx-lm adapter file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.nn as nn

from metapeft.nn.lora import LoRASpec, QLoRALinear, adapt_modules

__all__ = ["add_lora", "adapter_paths", "is_quantized", "load_model"]

# The module types that get adapters (mlx-lm also adapts embeddings and MoE experts).
_LORA_TYPES = (nn.Linear, nn.QuantizedLinear)


def load_model(path: str | Path) -> tuple[nn.Module, Any, dict[str, Any]]:
    """``mlx_lm.load`` with errors naming the folder: ``(model, tokenizer, config)``.

    Args:
        path: A local folder in mlx-lm's layout (``config.json`` with a supported
            ``model_type``, ``model*.safetensors``, tokenizer files); a ``.gguf`` file
            (llama.cpp's format), converted to such a folder once and kept
            (:func:`metapeft.lm.gguf.converted_folder`); or a Hugging
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

    if Path(path).suffix == ".gguf":
        from metapeft.lm.gguf import converted_folder

        path = converted_folder(path)
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
    return adapt_modules(model, set(adapter_paths(model, spec)), spec, fast)


def is_quantized(model: nn.Module) -> bool:
    """Whether any module of ``model`` is quantized (then meta-learners loop over tasks)."""
    return any(
        isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding, QLoRALinear))
        for m in model.modules()
    )
