"""A meta-training run from a :class:`~metapeft.config.MetaLearningConfig`.

:func:`train` builds the model, the learner and the task distributions a config
describes, meta-trains with a progress bar, evaluates on held-out tasks, writes
metrics (``metrics.jsonl``, and MLflow when configured: :mod:`metapeft.tracking`),
checkpoints (``checkpoints/last.safetensors`` every ``checkpoint_every`` steps and
``checkpoints/best.safetensors`` by validation query loss, with its meta-parameters
also as ``checkpoints/best.npz``) and the resolved config (``config.yaml``) into the
output folder, and can resume from ``last`` to the same parameters an uninterrupted
run reaches. Started by ``mlx.launch -n N``, it meta-trains on ``N`` ranks
(:mod:`metapeft.distributed`).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from metapeft import checkpoint, distributed, machine, tracking
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


def build_learner(config: Any, model: nn.Module, **settings: Any) -> MetaLearner:
    """The learner of ``config.training.algorithm`` with its usual outer optimizer
    (bias-corrected Adam at ``outer_lr``; Reptile's own step at ``epsilon``);
    ``settings`` replace the constructor arguments the config gives."""
    t = config.training
    cls = get_algorithm(t.algorithm)
    given = {
        "inner_lr": t.inner_lr,
        "inner_steps": t.inner_steps,
        "loss_fn": LOSSES[t.loss],
        "fast": config.model.blas_linear,
    }
    return cls.from_settings(model, getattr(t, cls.outer_lr_setting), **{**given, **settings})


# Seed offsets of the validation and evaluation samplers: their tasks are other draws
# than the training ones, and than each other's.
EVAL_SEED, VAL_SEED = 1_000_003, 2_000_003


def task_distributions(
    config: Any,
) -> tuple[TaskDistribution, TaskDistribution, TaskDistribution]:
    """The meta-training distribution, the validation one a run chooses its ``best``
    checkpoint on, and the held-out evaluation one ``metapeft evaluate`` reports on."""
    seed = config.training.seed
    return (
        TaskDistribution(config.task_configs(), seed=seed),
        TaskDistribution(config.task_configs(validation=True), seed=seed + VAL_SEED),
        TaskDistribution(config.task_configs(evaluation=True), seed=seed + EVAL_SEED),
    )


@dataclass
class Setup:
    """What a config builds: the model, its learner, the task samplers (meta-training,
    validation for ``best``, held-out evaluation), the metric reported beside the loss,
    and (``lm`` runs) the adapter spec to export."""

    model: nn.Module
    learner: MetaLearner
    train_tasks: Any
    val_tasks: Any
    eval_tasks: Any
    metric_fn: Any = None
    lora: Any = None


def setup(config: Any) -> Setup:
    """The :class:`Setup` of ``config``: an MLP over task families, or (``lm``) an mlx-lm
    model with LoRA adapters over text tasks."""
    if config.lm is None:
        model = build_model(config)
        metric_fn = accuracy if config.training.loss == "cross_entropy" else None
        return Setup(model, build_learner(config, model), *task_distributions(config), metric_fn)
    from metapeft import lm
    from metapeft.lm.model import is_quantized

    spec = config.lm
    t = config.training
    model, tokenizer, _ = lm.load_model(spec.model)
    mx.random.seed(t.seed)
    if spec.base_adapters is not None:
        adapter = lm.MetaLoRAAdapter.load(spec.base_adapters)
        adapter.apply(model)
        lora = adapter.spec
    else:
        lora = spec.lora.spec()
        lm.add_lora(model, lora)
    if spec.grad_checkpoint:
        lm.checkpoint_blocks(model)
    # MLX 0.32 has no vmap rule for quantized products nor for mx.checkpoint: those
    # models adapt their tasks one at a time.
    batched = not (spec.task_loop or spec.grad_checkpoint or is_quantized(model))
    learner = build_learner(config, model, loss_fn=lm.lm_loss, fast=True, batched=batched)
    sizes = (spec.support_size, spec.query_size, spec.max_seq_length)

    def tasks(path: Path | None, offset: int) -> lm.TextTasks:
        return lm.TextTasks.from_jsonl(path or spec.tasks_file, tokenizer, *sizes, t.seed + offset)

    val_file = spec.val_tasks_file
    return Setup(
        model,
        learner,
        tasks(spec.tasks_file, 0),
        tasks(val_file, VAL_SEED),
        tasks(spec.test_tasks_file or val_file, EVAL_SEED),
        lora=lora,
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

    Started on several ranks (``mlx.launch -n N``), every rank runs this with the same
    config: each draws the whole meta-batch and adapts its ``T / N`` tasks, and
    evaluates its share of the validation tasks; rank 0 alone writes the run folder
    (config, log, metrics, checkpoints) and the tracking; every rank resumes from the
    same ``last``, and all stop at the same step on Ctrl-C. A rank that fails or hangs
    stops the others within ``training.rank_timeout`` seconds, naming it.

    Raises:
        ValueError: On every rank, if ``meta_batch_size`` is not divisible by the number
            of ranks, or the ranks were started with different configs or checkpoints.
        metapeft.distributed.DistributedError: If a rank was lost.
    """
    world = distributed.world(config.training.rank_timeout)
    with world.reporting_termination():
        try:
            return _run(config, resume, on_step, world)
        except StopRequested:
            # Rank 0 has saved `last` and closed the run; the ranks leave together, as
            # mlx.launch stops the others once one has exited.
            world.any(True, "leaving together after Ctrl-C")
            raise


def _run(config: Any, resume: bool, on_step: Any, world: distributed.World) -> dict[str, Any]:
    """:func:`train` on one rank: rank 0 with the run folder, log and tracker."""
    paths = RunPaths(Path(config.output.output_dir))
    if world.size > 1:
        _agree(world, config, paths, resume)
    if world.rank != 0:  # the run folder, its log and the tracking are rank 0's
        silent = logging.NullHandler()
        logger.addHandler(silent)
        try:
            return _train(config, paths, resume, on_step, tracking.Tracker(), world)
        finally:
            logger.removeHandler(silent)
    try:
        paths.root.mkdir(parents=True, exist_ok=True)
        config.to_yaml(paths.config)
    except OSError as e:
        raise OSError(f"output dir {paths.root} is not writable: {e.strerror or e}") from None
    tracker = tracking.open_tracker(config, paths.root)
    handler = _log_to(paths.root)
    status: tracking.Status = "FAILED"
    try:
        summary = _train(config, paths, resume, on_step, tracker, world)
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


def _agree(world: distributed.World, config: Any, paths: RunPaths, resume: bool) -> None:
    """Checks, alike on every rank, that the ranks can run together: they were started
    with the same config (its output and tracking, rank 0's alone, aside) and resume
    from the same checkpoint, and the meta-batch splits over them. The exchange comes
    first: every rank has then got this far, so each says what is wrong before the
    first to exit makes the launcher stop the others."""
    settings = {k: v for k, v in config.to_dict().items() if k not in ("output", "tracking")}
    start = "a fresh start (no --resume)"
    if resume:
        try:
            start = f"checkpoint step {checkpoint.read_metadata(paths.last)['step']}"
        except (OSError, ValueError) as e:
            start = str(e)
    world.agree({"config": json.dumps(settings, sort_keys=True), "starting point": start})
    distributed.check_divisible(config.training.meta_batch_size, world.size)


def _train(
    config: Any,
    paths: RunPaths,
    resume: bool,
    on_step: Any,
    tracker: tracking.Tracker,
    world: distributed.World,
) -> dict[str, Any]:
    """The run itself; :func:`train` wraps it in the run's log file and tracker."""
    logger.info("machine: %s", json.dumps(machine.info()))
    logger.info("config: %s", json.dumps(config.to_dict(), default=str))
    if world.size > 1:
        logger.info("world: %d ranks (%s)", world.size, world.backend)
    run = setup(config)
    learner, metric_fn, train_tasks = run.learner, run.metric_fn, run.train_tasks
    learner.group = world.group
    held_out = run.val_tasks.sample(config.training.eval_tasks)
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
        if world.rank != 0:
            return
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
            with world.deadline(f"meta-step {learner.step + 1}"):
                metrics = learner.meta_train_step(episodes)
            metrics["seconds"] = time.perf_counter() - start
            spent += metrics["seconds"]
            done += 1
            rng_state = train_tasks.rng_state()
            step = learner.step
            metrics["steps_per_s"] = done / spent
            # MLX's peak so far: the counter is the user's, never reset here.
            metrics["peak_memory_mb"] = mx.get_peak_memory() / 2**20
            if step % config.training.eval_every == 0 or step == steps:
                with world.deadline(f"the validation after meta-step {step}"):
                    result = learner.evaluate(
                        held_out, config.training.eval_steps, metric_fn=metric_fn
                    )
                metrics["val_query_loss"] = result["query_loss"]
                if metric_fn is not None:
                    metrics["val_accuracy"] = float(result["query_metrics"].mean())
                if result["query_loss"] < best:
                    best = result["query_loss"]
                    save(paths.best)
            # The metrics before `last`: a run stopped between the two resumes from an
            # earlier `last`, and the resume drops the lines after it.
            tracker.log_metrics(step, metrics)
            if step % config.training.checkpoint_every == 0 or step == steps:
                save(paths.last)
            if "val_query_loss" in metrics:
                logger.info("step %d: %s", step, json.dumps(metrics))
            if on_step is not None:
                on_step(step, metrics)
            # Every rank stops after the same meta-step.
            if world.any(interrupt.requested, f"the stop check after meta-step {step}"):
                raise StopRequested
    except KeyboardInterrupt:
        save(paths.last)
        logger.warning("interrupted at step %d; saved %s", learner.step, paths.last)
        raise
    finally:
        interrupt.uninstall()
    if run.lora is not None and world.rank == 0:
        from metapeft.lm.train import export_adapters

        info = {**resolved["training"], "final": metrics}
        export_adapters(paths.root, run.model, run.lora, config.lm.model, info)
    logger.info("done: %d steps, best validation query loss %.6g", learner.step, best)
    return {
        "steps": learner.step,
        "final": metrics,
        "best_val_query_loss": best,
        "output_dir": str(paths.root),
        "checkpoint": str(paths.last),
        "best_checkpoint": str(paths.best),
    }


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
    rank_timeout: float | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Meta-learns a LoRA initialisation of an mlx-lm model over the tasks of a JSONL
    file and writes it to ``output_dir`` in mlx-lm's adapter format: a front-end to
    :func:`train` with an ``lm`` config, so ``output_dir`` is also a run folder
    (``config.yaml``, ``metrics.jsonl``, ``checkpoints/``), evaluated once at the end
    on ``meta_batch_size`` held-out draws.

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
        rank_timeout: On several ranks (``mlx.launch``), the seconds a rank waits for
            the others, through each meta-step included (default: the config's, 30).
        on_step: Called as ``on_step(step, metrics)`` after every meta-step; the
            metrics include the step's wall time, ``seconds``.

    Returns:
        :func:`train`'s summary, with ``seconds`` (in meta-steps).

    Example:
        >>> summary = meta_train_lora("tiny-llama", "tasks.jsonl", "meta-init", steps=10)
    """
    from metapeft.config import MetaLearningConfig

    cls = get_algorithm(algorithm)
    for name, value in (("steps", steps), ("meta_batch_size", meta_batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    lora = {"rank": rank, "alpha": alpha, "dropout": dropout, "num_layers": num_layers}
    if target_modules:
        lora["target_modules"] = list(target_modules)
    config = MetaLearningConfig.from_dict(
        {
            "lm": {
                "model": str(model_path),
                "tasks_file": str(tasks_path),
                "support_size": support_size,
                "query_size": query_size,
                "max_seq_length": max_seq_length,
                "lora": lora,
                "base_adapters": None if base_adapters is None else str(base_adapters),
                "grad_checkpoint": grad_checkpoint,
                "task_loop": task_loop,
            },
            "training": {
                "algorithm": algorithm,
                "num_iterations": steps,
                "meta_batch_size": meta_batch_size,
                "inner_lr": inner_lr,
                "inner_steps": inner_steps,
                cls.outer_lr_setting: cls.default_outer_lr if outer_lr is None else outer_lr,
                "seed": seed,
                "checkpoint_every": steps,
                "eval_every": steps,
                "eval_tasks": meta_batch_size,
                "eval_steps": inner_steps,
            },
            "output": {"output_dir": str(output_dir)},
        },
        overrides={"training": {"rank_timeout": rank_timeout}},  # None: the default
    )
    seconds = 0.0

    def step_done(step: int, metrics: dict[str, float]) -> None:
        nonlocal seconds
        seconds += metrics["seconds"]
        if on_step is not None:
            on_step(step, metrics)

    return {**train(config, on_step=step_done), "seconds": seconds}


class StopRequested(KeyboardInterrupt):
    """Ctrl-C, taken at a step boundary (on every rank after the same meta-step)."""


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
