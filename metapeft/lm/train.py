"""The learner for an mlx-lm model's adapters, and the files a meta-trained one is
exported as (an mlx-lm adapter folder and a ``mlx_lm.lora -c`` config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from metapeft.files import atomic_write_text
from metapeft.learners import MetaLearner, registry
from metapeft.lm.adapters import ADAPTER_FILE, save_adapters
from metapeft.lm.data import lm_loss
from metapeft.lm.gguf import converted_folder
from metapeft.nn.lora import LoRASpec

__all__ = ["LORA_CONFIG", "build_learner", "export_adapters"]

LORA_CONFIG = "lora_config.yaml"


def build_learner(
    model: Any,
    algorithm: str,
    inner_lr: float,
    inner_steps: int,
    outer_lr: float,
    batched: bool,
    fast: bool = True,
) -> MetaLearner:
    """The learner for ``algorithm`` on ``model``'s adapters with :func:`lm_loss`.

    ``outer_lr`` is the outer step size: Reptile's epsilon, else the rate of
    bias-corrected Adam. ``fast`` as in the learners: the model on metapeft's fast
    layers.
    """
    return registry.build_learner(
        algorithm,
        model,
        outer_lr=outer_lr,
        inner_lr=inner_lr,
        inner_steps=inner_steps,
        batched=batched,
        loss_fn=lm_loss,
        fast=fast,
    )


def export_adapters(
    folder: str | Path, model: Any, spec: LoRASpec, model_path: str | Path, info: dict[str, Any]
) -> None:
    """Writes ``model``'s adapters to ``folder`` as mlx-lm does (``adapters.safetensors``,
    ``adapter_config.json`` with ``info`` under ``meta_learning``) and
    ``lora_config.yaml``, the settings ``mlx_lm.lora -c`` needs to fine-tune a new task
    from them (add ``--data`` and ``--train``)."""
    folder, local = Path(folder), Path(model_path)
    if local.suffix == ".gguf":  # mlx-lm reads the folder it was converted to
        local = converted_folder(local)
    model_path = str(local.resolve()) if local.exists() else str(model_path)
    config = {"model": model_path, "meta_learning": info}
    save_adapters(folder, model.trainable_parameters(), spec, config)
    lora_config = {
        "model": model_path,
        "fine_tune_type": "lora",
        "num_layers": spec.num_layers,
        "lora_parameters": spec.lora_parameters(),
        "resume_adapter_file": str((folder / ADAPTER_FILE).resolve()),
    }
    atomic_write_text(folder / LORA_CONFIG, yaml.safe_dump(lora_config, sort_keys=False))
