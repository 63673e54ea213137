"""Adapters in mlx-lm's format: ``adapters.safetensors`` + ``adapter_config.json``.

:func:`save_adapters` writes what ``mlx_lm.load(model, adapter_path=DIR)`` and
``mlx_lm.lora --resume-adapter-file DIR/adapters.safetensors`` read;
:class:`MetaLoRAAdapter` puts such a file (a meta-learned initialisation, or any
mlx-lm adapter) on a model for fine-tuning in your own code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from metapeft.files import atomic_write, atomic_write_text
from metapeft.lm.model import add_lora
from metapeft.nn.lora import LoRASpec

__all__ = ["ADAPTER_CONFIG", "ADAPTER_FILE", "MetaLoRAAdapter", "read_adapters", "save_adapters"]

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def save_adapters(
    folder: str | Path,
    weights: dict[str, mx.array] | Any,
    spec: LoRASpec,
    config: dict[str, Any] | None = None,
) -> Path:
    """Writes adapter weights and their config in mlx-lm's format, atomically.

    Args:
        folder: The adapter folder (created if needed).
        weights: The adapter tree or flat dict (``model.trainable_parameters()``),
            names as in the model (``model.layers.0.self_attn.q_proj.lora_a``).
        spec: The adapters' rank, alpha, dropout, keys and blocks.
        config: More entries for ``adapter_config.json`` (``model``, metadata);
            mlx-lm ignores keys it does not use.

    Returns:
        The folder.

    Example:
        >>> save_adapters("meta-init", model.trainable_parameters(), spec, {"model": "tiny"})
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat = dict(tree_flatten(weights)) if not _is_flat(weights) else dict(weights)
    if not flat:
        raise ValueError("no adapter weights to save")
    bad = [k for k in flat if k.rsplit(".", 1)[-1] not in ("lora_a", "lora_b")]
    if bad:
        raise ValueError(f"not adapter weights (lora_a/lora_b): {bad[:5]}")
    per_task = [k for k, v in flat.items() if v.ndim != 2]
    if per_task:
        raise ValueError(
            f"adapters must be 2-D (one task), got {per_task[0]} {flat[per_task[0]].shape}"
        )
    record = dict(config or {})
    record.update(
        fine_tune_type="lora",
        num_layers=spec.num_layers,
        lora_parameters=spec.lora_parameters(),
    )
    atomic_write(folder / ADAPTER_FILE, lambda tmp: mx.save_safetensors(str(tmp), flat))
    text = json.dumps(record, indent=4, sort_keys=True) + "\n"
    atomic_write_text(folder / ADAPTER_CONFIG, text)
    return folder


def _is_flat(weights: Any) -> bool:
    return isinstance(weights, dict) and all(isinstance(v, mx.array) for v in weights.values())


def read_adapters(folder: str | Path) -> tuple[dict[str, mx.array], LoRASpec, dict[str, Any]]:
    """Reads an mlx-lm adapter folder: ``(flat weights, spec, full config)``.

    Raises:
        FileNotFoundError: If the folder or one of its two files is missing.
        ValueError: Naming the file, if the config is not valid JSON or not a LoRA
            config, or the weights are not readable.
    """
    folder = Path(folder)
    config_file, weight_file = folder / ADAPTER_CONFIG, folder / ADAPTER_FILE
    for f in (config_file, weight_file):
        if not f.is_file():
            raise FileNotFoundError(
                f"{f}: missing (an mlx-lm adapter folder has {ADAPTER_CONFIG} and {ADAPTER_FILE})"
            )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: expected a JSON object")
    spec = LoRASpec.from_adapter_config(config, config_file)
    try:
        weights = mx.load(str(weight_file), format="safetensors")
    except Exception as e:  # MLX raises several types for a damaged file
        raise ValueError(f"{weight_file}: not a readable safetensors file ({e})") from None
    return weights, spec, config


def check_adapter_weights(
    model: nn.Module, weights: dict[str, mx.array], source: str | Path
) -> None:
    """Raises ValueError naming ``source`` and the modules unless ``weights`` has exactly
    the adapter names and shapes of ``model`` (another rank, another architecture or
    other target modules all fail here)."""
    want = {k: v.shape for k, v in tree_flatten(model.trainable_parameters())}
    got = {k: v.shape for k, v in weights.items()}
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    shapes = [
        f"{k}: file {got[k]}, model {want[k]}"
        for k in sorted(set(want) & set(got))
        if got[k] != want[k]
    ]
    if not (missing or extra or shapes):
        return
    parts = []
    if shapes:
        parts.append(f"shape mismatch (another rank or architecture?) for {'; '.join(shapes[:4])}")
    if extra:
        parts.append(f"modules the model does not adapt: {', '.join(extra[:4])}")
    if missing:
        parts.append(f"adapters missing for: {', '.join(missing[:4])}")
    raise ValueError(f"{source}: adapters do not fit this model: " + " | ".join(parts))


class MetaLoRAAdapter:
    """A LoRA adapter whose starting point is a meta-learned initialisation.

    Load it from a folder written by ``metapeft meta-train-lora`` (or any mlx-lm
    LoRA adapter folder), put it on a model with :meth:`apply`, fine-tune the
    model's trainable parameters in your own loop, and call :meth:`reset` before
    the next task to start again from the initialisation.

    Args:
        weights: Flat adapter weights (``model.layers.0.self_attn.q_proj.lora_a`` ...).
        spec: Rank, alpha, dropout, keys and blocks.
        config: The rest of ``adapter_config.json`` (e.g. ``model``, ``meta_learning``).

    Example:
        >>> model, tokenizer = mlx_lm.load("tiny-llama")
        >>> adapter = MetaLoRAAdapter.load("meta-init")
        >>> model = adapter.apply(model)     # adapters at the meta-learned init
        >>> # ... fine-tune model.trainable_parameters() on a new task ...
        >>> adapter.reset(model)             # back to the init for the next task
    """

    def __init__(
        self, weights: dict[str, mx.array], spec: LoRASpec, config: dict[str, Any] | None = None
    ) -> None:
        self.weights = dict(weights)
        self.spec = spec
        self.config = dict(config or {})
        self.source = "adapter weights"

    @classmethod
    def load(cls, folder: str | Path) -> MetaLoRAAdapter:
        """Reads an adapter folder (``adapter_config.json`` + ``adapters.safetensors``)."""
        weights, spec, config = read_adapters(folder)
        adapter = cls(weights, spec, config)
        adapter.source = str(Path(folder) / ADAPTER_FILE)
        return adapter

    @classmethod
    def from_model(
        cls, model: nn.Module, spec: LoRASpec, config: dict[str, Any] | None = None
    ) -> MetaLoRAAdapter:
        """The adapter currently on ``model`` (its trainable parameters)."""
        return cls(dict(tree_flatten(model.trainable_parameters())), spec, config)

    def parameters(self) -> dict[str, Any]:
        """The initialisation as a tree, to pass to ``model.update``."""
        return tree_unflatten(list(self.weights.items()))

    def apply(self, model: nn.Module, fast: bool = True) -> nn.Module:
        """Adds LoRA layers to ``model`` (as mlx-lm would for this config) set to the
        initialisation, and freezes the rest; returns ``model``.

        Raises:
            ValueError: If the config's modules or the weights do not fit the model
                (names the file and the modules).
        """
        try:
            add_lora(model, self.spec, fast=fast)
        except ValueError as e:
            raise ValueError(f"{self.source}: {e}") from None
        self.reset(model)
        return model

    def reset(self, model: nn.Module) -> nn.Module:
        """Sets ``model``'s adapters back to the initialisation; returns ``model``."""
        check_adapter_weights(model, self.weights, self.source)
        model.update(self.parameters())
        mx.eval(model.trainable_parameters())
        return model

    def save(self, folder: str | Path) -> Path:
        """Writes the adapter in mlx-lm's format (see :func:`save_adapters`)."""
        return save_adapters(folder, self.weights, self.spec, self.config)
