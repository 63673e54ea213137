"""A meta-training run from a :class:`~metapeft.config.MetaLearningConfig`.

:func:`train` builds the model, the learner and the task distributions a config
describes, meta-trains with a progress bar, evaluates on held-out tasks, writes
metrics (``metrics.jsonl``, and MLflow when configured: :mod:`metapeft.tracking`),
checkpoints (``checkpoints/last.safetensors`` every ``checkpoint_every`` steps and
``checkpoints/best.safetensors`` by validation query loss, with its meta-parameters
also as ``checkpoints/best.npz``) and the resolved config (``config.yaml``) into the
output folder, and can resume from ``last`` to the same parameters an uninterrupted
run reaches.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from metapeft import checkpoint, machine, tracking
from metapeft.learners import MetaLearner, get_algorithm
from metapeft.nn import apply_lora, use_blas_linear
from metapeft.tasks import TaskDistribution

logger = logging.getLogger("metapeft")

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def mse(model: nn.Module, x: mx.array, y: mx.array) -> mx.array:
    """Mean squared error of ``model(x)`` against ``y``."""
    return nn.losses.mse_loss(model(x), y)


def cross_entropy(model: nn.Module, x: mx.array, y: mx.array) -> mx.array:
    """Mean cross-entropy of the logits ``model(x)`` against integer labels ``y``."""
    return nn.losses.cross_entropy(model(x), y, reduction="mean")


def accuracy(model: nn.Module, x: mx.array, y: mx.array) -> mx.array:
    """Fraction of ``y`` predicted by the arg-max of ``model(x)``."""
    return (mx.argmax(model(x), axis=-1) == y).astype(mx.float32).mean()


LOSSES = {"mse": mse, "cross_entropy": cross_entropy}


@dataclass
class RunPaths:
    """Where a run keeps its outputs."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def last(self) -> Path:
        return self.root / "checkpoints" / "last.safetensors"

    @property
    def best(self) -> Path:
        return self.root / "checkpoints" / "best.safetensors"

    @property
    def best_npz(self) -> Path:
        return self.root / "checkpoints" / "best.npz"


def build_model(config: Any) -> nn.Module:
    """The MLP the config describes, with LoRA adapters or BLAS layers as asked."""
    spec = config.model
    dims = config.layer_sizes
    mx.random.seed(config.training.seed)
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers.append(ACTIVATIONS[spec.activation]())
    model = nn.Sequential(*layers)
    if spec.lora is not None:
        lora = spec.lora
        apply_lora(
            model, lora.rank, lora.alpha, lora.dropout, lora.target_modules, spec.blas_linear
        )
    elif spec.blas_linear:
        use_blas_linear(model)
    mx.eval(model.parameters())
    return model


def build_learner(config: Any, model: nn.Module) -> MetaLearner:
    """The learner of ``config.training.algorithm`` with its usual outer optimizer
    (bias-corrected Adam at ``outer_lr``; Reptile's own step at ``epsilon``)."""
    t = config.training
    cls = get_algorithm(t.algorithm)
    return cls.from_settings(
        model,
        getattr(t, cls.outer_lr_setting),
        inner_lr=t.inner_lr,
        inner_steps=t.inner_steps,
        loss_fn=LOSSES[t.loss],
        fast=config.model.blas_linear,
    )


def task_distributions(config: Any) -> tuple[TaskDistribution, TaskDistribution]:
    """(meta-training distribution, held-out evaluation distribution)."""
    seed = config.training.seed
    return (
        TaskDistribution(config.task_configs(), seed=seed),
        TaskDistribution(config.task_configs(evaluation=True), seed=seed + 1_000_003),
    )


def train(
    config: Any,
    *,
    resume: bool = False,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Meta-trains as ``config`` says; returns a summary of the run.

    ``on_step(step, metrics)`` is called after every meta-step (the CLI's progress
    bar). A ``KeyboardInterrupt`` saves ``last`` before it propagates, so that
    ``resume=True`` carries on from there.
    """
    paths = RunPaths(Path(config.output.output_dir))
    try:
        paths.root.mkdir(parents=True, exist_ok=True)
        config.to_yaml(paths.config)
    except OSError as e:
        raise OSError(f"output dir {paths.root} is not writable: {e.strerror or e}") from None
    tracker = tracking.open_tracker(config, paths.root)
    handler = _log_to(paths.root)
    status: tracking.Status = "FAILED"
    try:
        summary = _train(config, paths, resume, on_step, tracker)
        status = "FINISHED"
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        logger.removeHandler(handler)
        handler.close()
        _keep_artifacts(tracker, paths, Path(handler.baseFilename))
        tracker.finish(status)


def _train(
    config: Any, paths: RunPaths, resume: bool, on_step: Any, tracker: tracking.Tracker
) -> dict[str, Any]:
    """The run itself; :func:`train` wraps it in the run's log file and tracker."""
    logger.info("machine: %s", json.dumps(machine.info()))
    logger.info("config: %s", json.dumps(config.to_dict(), default=str))
    model = build_model(config)
    learner = build_learner(config, model)
    metric_fn = accuracy if config.training.loss == "cross_entropy" else None
    train_tasks, eval_tasks = task_distributions(config)
    held_out = eval_tasks.sample(config.training.eval_tasks)
    best = float("inf")
    if resume:
        if not paths.last.is_file():
            raise FileNotFoundError(f"{paths.last}: no checkpoint to resume from")
        extra = learner.load(paths.last)
        train_tasks.set_rng_state(extra["task_rng"])
        best = extra.get("best_val_query_loss", best)
    tracker.start(config, resume=resume, step=learner.step)
    tracker.log_artifact(paths.config)

    resolved = config.to_dict()
    # The sampler's state before the current step's draw: what a resumed run redraws from.
    rng_state = train_tasks.rng_state()

    def save(path: Path) -> None:
        # The resolved config makes the checkpoint self-contained (evaluate, export).
        extra = {"task_rng": rng_state, "best_val_query_loss": best, "config": resolved}
        learner.save(path, extra)
        if path == paths.best:
            checkpoint.save_npz(paths.best_npz, learner.meta_parameters()["params"])

    steps = config.training.num_iterations
    spent, done = 0.0, 0  # seconds in, and number of, meta-steps this session
    metrics: dict[str, float] = {}
    interrupt = StepBoundaryInterrupt()
    try:
        interrupt.install()
        while learner.step < steps:
            episodes = train_tasks.sample(config.training.meta_batch_size)
            start = time.perf_counter()
            metrics = learner.meta_train_step(episodes)
            spent += time.perf_counter() - start
            done += 1
            rng_state = train_tasks.rng_state()
            step = learner.step
            metrics["steps_per_s"] = done / spent
            # MLX's peak so far: the counter is the user's, never reset here.
            metrics["peak_memory_mb"] = mx.get_peak_memory() / 2**20
            if step % config.training.eval_every == 0 or step == steps:
                result = learner.evaluate(held_out, config.training.eval_steps, metric_fn=metric_fn)
                metrics["val_query_loss"] = result["query_loss"]
                if metric_fn is not None:
                    metrics["val_accuracy"] = float(result["query_metrics"].mean())
                if result["query_loss"] < best:
                    best = result["query_loss"]
                    save(paths.best)
            if step % config.training.checkpoint_every == 0 or step == steps:
                save(paths.last)
            tracker.log_metrics(step, metrics)
            if "val_query_loss" in metrics:
                logger.info("step %d: %s", step, json.dumps(metrics))
            if on_step is not None:
                on_step(step, metrics)
            if interrupt.requested:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        save(paths.last)
        logger.warning("interrupted at step %d; saved %s", learner.step, paths.last)
        raise
    finally:
        interrupt.uninstall()
    logger.info("done: %d steps, best validation query loss %.6g", learner.step, best)
    return {
        "steps": learner.step,
        "final": metrics,
        "best_val_query_loss": best,
        "output_dir": str(paths.root),
        "checkpoint": str(paths.last),
        "best_checkpoint": str(paths.best),
    }


class StepBoundaryInterrupt:
    """Ctrl-C lets the current meta-step finish, so that ``last`` is saved at a step
    boundary and a resumed run is exact; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("Ctrl-C: stopping after this meta-step (press again to stop now)")


def _log_to(folder: Path) -> logging.Handler:
    """Sends the ``metapeft`` logger to a dated log file in ``folder``."""
    handler = logging.FileHandler(folder / time.strftime("train-%Y%m%d-%H%M%S.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


def _keep_artifacts(tracker: tracking.Tracker, paths: RunPaths, log_file: Path) -> None:
    """Hands the run's checkpoints and log file to the tracker."""
    for path in (paths.last, paths.best, paths.best_npz):
        if path.is_file():
            tracker.log_artifact(path, "checkpoints")
    tracker.log_artifact(log_file)
