"""Meta-training LoRA adapters of an mlx-lm model over text tasks, and export."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import yaml

from metapeft.files import atomic_write_text
from metapeft.learners import MetaLearner, registry
from metapeft.lm.adapters import ADAPTER_FILE, MetaLoRAAdapter, read_adapters, save_adapters
from metapeft.lm.data import TextTasks, lm_loss
from metapeft.lm.memory import checkpoint_blocks
from metapeft.lm.model import LoRASpec, add_lora, is_quantized, load_model

__all__ = ["build_learner", "meta_train_lora"]

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


def meta_train_lora(
    model_path: str | Path,
    tasks_path: str | Path,
    output_dir: str | Path,
    *,
    algorithm: str = "reptile",
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    num_layers: int = -1,
    base_adapters: str | Path | None = None,
    steps: int = 100,
    meta_batch_size: int = 4,
    support_size: int = 4,
    query_size: int = 4,
    inner_lr: float = 0.05,
    inner_steps: int = 3,
    outer_lr: float | None = None,
    max_seq_length: int = 512,
    grad_checkpoint: bool = False,
    task_loop: bool = False,
    seed: int = 0,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Meta-learns a LoRA initialisation of an mlx-lm model over the tasks of a JSONL
    file and writes it to ``output_dir`` in mlx-lm's adapter format.

    Outputs: ``adapters.safetensors`` and ``adapter_config.json`` (``mlx_lm.load(model,
    adapter_path=output_dir)`` reads them; the config also records the meta-training
    settings and final metrics) and ``lora_config.yaml``, a config for ``mlx_lm.lora
    -c`` that starts fine-tuning a new task from the meta-learned adapters.

    Args:
        model_path: mlx-lm model folder (or Hugging Face name when online).
        tasks_path: JSONL with ``task`` and ``text`` or ``prompt``/``completion``.
        output_dir: Where the adapters go.
        algorithm: A name in :data:`metapeft.learners.ALGORITHMS` (``reptile``,
            ``fomaml``, ``maml``, ...).
        rank, alpha, dropout: LoRA settings (mlx-lm's ``scale`` is ``alpha / rank``).
        target_modules: mlx-lm ``keys`` (paths inside a block); None: every Linear.
        num_layers: Adapt the last ``num_layers`` blocks; -1: all.
        base_adapters: An mlx-lm adapter folder to start from; its rank, scale,
            dropout, keys and blocks replace ``rank`` ... ``num_layers``.
        steps: Meta-steps.
        meta_batch_size: Tasks per meta-step ``T``.
        support_size, query_size: Examples per task in each set.
        inner_lr, inner_steps: The inner SGD loop.
        outer_lr: Reptile's epsilon or the Adam rate (default: the algorithm's
            ``default_outer_lr``, 0.1 and 1e-3).
        max_seq_length: Longer examples are cut.
        grad_checkpoint: Recompute block activations in the backward pass (tasks
            then adapt one at a time).
        task_loop: Adapt tasks one at a time instead of all at once (less memory;
            always the case on a quantized model).
        seed: Seeds the adapter initialisation and the task sampler.
        on_step: Called as ``on_step(step, metrics)`` after every meta-step; the
            metrics include the step's wall time, ``seconds``.

    Returns:
        A summary: ``steps``, ``final`` metrics, ``seconds`` (in meta-steps),
        ``output_dir``.

    Example:
        >>> summary = meta_train_lora("tiny-llama", "tasks.jsonl", "meta-init", steps=10)
    """
    cls = registry.get_algorithm(algorithm)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not isinstance(meta_batch_size, int) or meta_batch_size < 1:
        raise ValueError(f"meta_batch_size must be an int >= 1, got {meta_batch_size!r}")
    if outer_lr is None:
        outer_lr = cls.default_outer_lr
    model, tokenizer, _ = load_model(model_path)
    tasks = TextTasks.from_jsonl(
        tasks_path, tokenizer, support_size, query_size, max_seq_length, seed
    )
    mx.random.seed(seed)
    if base_adapters is not None:
        weights, spec, _ = read_adapters(base_adapters)
        adapter = MetaLoRAAdapter(weights, spec)
        adapter.source = str(Path(base_adapters) / ADAPTER_FILE)
        adapter.apply(model)
    else:
        keys = tuple(target_modules) if target_modules else None
        spec = LoRASpec(rank, alpha, dropout, keys, num_layers)
        add_lora(model, spec)
    if grad_checkpoint:
        checkpoint_blocks(model)
    # MLX 0.32 has no vmap rule for quantized products nor for mx.checkpoint: those
    # models adapt their tasks one at a time.
    batched = not (task_loop or grad_checkpoint or is_quantized(model))
    learner = build_learner(model, algorithm, inner_lr, inner_steps, outer_lr, batched)
    metrics: dict[str, float] = {}
    seconds = 0.0
    for step in range(1, steps + 1):
        episodes = tasks.sample(meta_batch_size)
        start = time.perf_counter()
        metrics = learner.meta_train_step(episodes)
        spent = time.perf_counter() - start
        seconds += spent
        if on_step is not None:
            on_step(step, {**metrics, "seconds": spent})
    settings = {
        "algorithm": algorithm,
        "steps": steps,
        "meta_batch_size": meta_batch_size,
        "support_size": support_size,
        "query_size": query_size,
        "inner_lr": inner_lr,
        "inner_steps": inner_steps,
        "outer_lr": outer_lr,
        "max_seq_length": max_seq_length,
        "seed": seed,
        "tasks": str(tasks_path),
        "base_adapters": None if base_adapters is None else str(base_adapters),
        "final": metrics,
    }
    output_dir = Path(output_dir)
    config = {"model": str(model_path), "meta_learning": settings}
    save_adapters(output_dir, model.trainable_parameters(), spec, config)
    _write_lora_config(output_dir, model_path, spec)
    return {"steps": steps, "final": metrics, "seconds": seconds, "output_dir": str(output_dir)}


def _write_lora_config(output_dir: Path, model_path: str | Path, spec: LoRASpec) -> None:
    """``lora_config.yaml``: the settings ``mlx_lm.lora -c`` needs to resume from these
    adapters (add ``--data`` and ``--train``)."""
    local = Path(model_path)
    config = {
        "model": str(local.resolve()) if local.exists() else str(model_path),
        "fine_tune_type": "lora",
        "num_layers": spec.num_layers,
        "lora_parameters": spec.lora_parameters(),
        "resume_adapter_file": str((output_dir / ADAPTER_FILE).resolve()),
    }
    text = yaml.safe_dump(config, sort_keys=False)
    atomic_write_text(output_dir / LORA_CONFIG, text)
