"""MetaLearner: what every algorithm shares (state, the outer step, adapt, evaluate, save)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from metapeft import checkpoint
from metapeft.learners.core import (
    FUSED_UPDATE,
    REFERENCE_UPDATE,
    LossFn,
    Update,
    inner_loop,
    make_task_loss,
    stop_gradient,
    tree_distance,
)
from metapeft.nn.fast import use_fast_layers

# Per-task results of one task's meta-objective: (query loss, support loss, distance moved).
TaskResult = tuple[mx.array, mx.array, mx.array]


class MetaLearner:
    """Base of the meta-learners: holds the model, the outer optimizer and the step count.

    Only the model's trainable parameters are meta-learned (after
    :func:`metapeft.nn.apply_lora`, only the adapters). The inner loop adapts
    every task of a meta-batch at once (``mx.vmap`` over the task axis, fused
    :func:`metapeft.ops.task_sgd` updates); ``batched=False`` selects the naive
    reference instead, a Python loop over tasks with stock MLX updates that
    gives the same numbers.

    Args:
        model: Any ``mlx.nn.Module``; its trainable parameters are the meta-parameters.
        optimizer: The outer optimizer, any ``mlx.optimizers.Optimizer``.
        inner_lr: Step size of the inner SGD loop.
        inner_steps: Inner steps per task during meta-training.
        batched: All tasks at once (fast path) or a loop over tasks (reference).
        compile: Wrap the meta-step in ``mx.compile`` (batched path only).
        fast: Put the model on metapeft's fast path first
            (:func:`metapeft.nn.use_fast_layers`: BLAS products, fused attention,
            SwiGLU and tied output layers, in place, weights shared and results
            unchanged); False keeps the model's own layers.
        loss_fn: ``loss_fn(model, x, y) -> scalar`` for one task (MLX's convention).
            It may instead be given to :meth:`meta_train_step`, which remembers it
            for :meth:`adapt` and :meth:`evaluate`.
    """

    name = "meta_learner"
    first_order = False

    def __init__(
        self,
        model: nn.Module,
        optimizer: optim.Optimizer | None = None,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        batched: bool = True,
        compile: bool = True,
        loss_fn: LossFn | None = None,
        fast: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an mlx.nn.Module, got {type(model).__name__}")
        if fast:
            # In place. A model that is itself one swappable layer (a bare nn.Linear)
            # is kept: the caller's object is the one that learns.
            use_fast_layers(model)
        if inner_steps < 1:
            raise ValueError(f"inner_steps must be >= 1, got {inner_steps}")
        if not (isinstance(inner_lr, (int, float)) and math.isfinite(inner_lr) and inner_lr > 0):
            raise ValueError(f"inner_lr must be a finite float > 0, got {inner_lr!r}")
        if not tree_flatten(model.trainable_parameters()):
            raise ValueError("model has no trainable parameters to meta-learn")
        self.model = model
        self.optimizer = optimizer if optimizer is not None else self.default_optimizer()
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.batched = batched
        self.loss_fn = loss_fn
        self.step = 0
        self._compiled: dict[Any, Any] = {}
        self._use_compile = compile

    def default_optimizer(self) -> optim.Optimizer | None:
        """The outer optimizer when none is given: bias-corrected Adam, as published MAML."""
        return optim.Adam(1e-3, bias_correction=True)

    # ------------------------------------------------------------ meta-parameters
    def meta_parameters(self) -> dict[str, Any]:
        """The tree the outer optimizer updates: ``{"params": ...}`` (and more in subclasses)."""
        return {"params": self.model.trainable_parameters()}

    def set_meta_parameters(self, meta: dict[str, Any]) -> None:
        self.model.update(meta["params"])

    def inner_rates(self, meta: dict[str, Any]) -> Any:
        """The inner learning rate(s) given the meta-parameters (a float, or a tree)."""
        return self.inner_lr

    # ---------------------------------------------------------------- one task
    def adapt_task(
        self,
        meta: dict[str, Any],
        sx: mx.array,
        sy: mx.array,
        qx: mx.array,
        qy: mx.array,
        loss_fn: LossFn,
        update: Update,
        steps: int | None = None,
        first_order: bool | None = None,
    ) -> tuple[Any, mx.array, mx.array]:
        """Adapt to one task's support set: (adapted params, query loss, support loss before)."""
        task_loss = make_task_loss(self.model, loss_fn)
        adapted, support_loss = inner_loop(
            task_loss,
            meta["params"],
            sx,
            sy,
            self.inner_rates(meta),
            self.inner_steps if steps is None else steps,
            update,
            self.first_order if first_order is None else first_order,
        )
        return adapted, task_loss(adapted, qx, qy), support_loss

    def task_objective(
        self,
        meta: dict[str, Any],
        sx: mx.array,
        sy: mx.array,
        qx: mx.array,
        qy: mx.array,
        loss_fn: LossFn,
        update: Update,
    ) -> TaskResult:
        """One task's (query loss after adaptation, support loss before, distance moved)."""
        adapted, query_loss, support_loss = self.adapt_task(meta, sx, sy, qx, qy, loss_fn, update)
        return query_loss, support_loss, tree_distance(adapted, meta["params"])

    # --------------------------------------------------------------- meta-step
    def meta_train_step(self, episodes: Any, loss_fn: LossFn | None = None) -> dict[str, float]:
        """One outer step on a meta-batch; returns ``support_loss``, ``query_loss``, ``param_diff``.

        ``support_loss`` is the mean support loss before adaptation, ``query_loss``
        the mean query loss after it, ``param_diff`` the mean distance the inner
        loop moved the parameters. A non-finite loss raises ``FloatingPointError``
        and leaves the meta-parameters and the optimizer state as they were.
        """
        _num_tasks(episodes)
        loss_fn = self._loss(loss_fn)
        self.loss_fn = loss_fn
        meta = self.meta_parameters()
        data = (episodes.support_x, episodes.support_y, episodes.query_x, episodes.query_y)
        state = self.optimizer.state if self.optimizer is not None else {}
        saved = tree_map(lambda x: x, state)
        try:
            if self.batched:
                new_meta, metrics = self._compiled_step(loss_fn)(meta, *data)
            else:
                new_meta, metrics = self.outer_step(meta, data, loss_fn, batched=False)
            mx.eval(new_meta, metrics, state)
            values = {k: v.item() for k, v in metrics.items()}
        except BaseException:
            # e.g. Ctrl-C mid-step: the optimizer state stays that of the last full step
            _assign(state, saved)
            self._compiled.clear()
            raise
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            _assign(state, saved)
            raise FloatingPointError(
                f"{self.name}: non-finite {', '.join(bad)} at meta-step {self.step + 1}; "
                f"meta-parameters kept from step {self.step}"
            )
        self.set_meta_parameters(new_meta)
        self.step += 1
        return values

    def outer_step(
        self, meta: dict, data: tuple, loss_fn: LossFn, batched: bool
    ) -> tuple[dict, dict[str, mx.array]]:
        """The new meta-parameters and the step's metrics, lazily; a pure function of
        (meta-parameters, episodes) and the optimizer state. Gradient-based by default."""
        (query, support, diff), grads = (
            self._batched_grad(meta, data, loss_fn)
            if batched
            else self._naive_grad(meta, data, loss_fn)
        )
        new_meta = self.optimizer.apply_gradients(grads, meta)
        return new_meta, {"support_loss": support, "query_loss": query, "param_diff": diff}

    def _compiled_step(self, loss_fn: LossFn):
        """``outer_step`` on the batched path, compiled with the optimizer state as state."""
        if loss_fn not in self._compiled:

            def step(meta, *data):
                return self.outer_step(meta, data, loss_fn, batched=True)

            if self._use_compile:
                state = []
                if self.optimizer is not None:
                    self.optimizer.init(self.meta_parameters())
                    state = [self.optimizer.state]
                step = mx.compile(step, inputs=state, outputs=state)
            self._compiled[loss_fn] = step
        return self._compiled[loss_fn]

    def _batched_grad(self, meta: dict, data: tuple, loss_fn: LossFn) -> tuple:
        def objective(meta, sx, sy, qx, qy):
            per_task = mx.vmap(
                lambda m, a, b, c, d: self.task_objective(m, a, b, c, d, loss_fn, FUSED_UPDATE),
                in_axes=(None, 0, 0, 0, 0),
            )(meta, sx, sy, qx, qy)
            return tuple(r.mean() for r in per_task)

        return mx.value_and_grad(objective)(meta, *data)

    def _naive_grad(self, meta: dict, data: tuple, loss_fn: LossFn) -> tuple:
        """The reference: one task at a time, stock MLX updates, gradients averaged."""
        grad_fn = mx.value_and_grad(
            lambda m, a, b, c, d: self.task_objective(m, a, b, c, d, loss_fn, REFERENCE_UPDATE)
        )
        tasks = data[0].shape[0]
        total, grads = None, None
        for t in range(tasks):
            values, g = grad_fn(meta, *(a[t] for a in data))
            total = values if total is None else tuple(map(mx.add, total, values))
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(total, grads)
        return tuple(v / tasks for v in total), tree_map(lambda g: g / tasks, grads)

    # ------------------------------------------------------------ adapt, evaluate
    def adapt(
        self,
        support_x: mx.array,
        support_y: mx.array,
        steps: int | None = None,
        *,
        loss_fn: LossFn | None = None,
    ) -> Any:
        """Adapted parameters for one new task, from its support set.

        Leaves the meta-parameters unchanged. ``support_x``/``support_y`` hold one
        task's examples (no task axis). Returns a tree like
        ``model.trainable_parameters()``; load it with ``model.update(...)``.
        """
        steps = self.inner_steps if steps is None else steps
        meta = stop_gradient(self.meta_parameters())
        task_loss = make_task_loss(self.model, self._loss(loss_fn))
        adapted, _ = inner_loop(
            task_loss,
            meta["params"],
            support_x,
            support_y,
            self.inner_rates(meta),
            steps,
            FUSED_UPDATE,
            first_order=True,
        )
        mx.eval(adapted)
        return adapted

    def evaluate(
        self,
        episodes: Any,
        steps: int | None = None,
        *,
        loss_fn: LossFn | None = None,
        metric_fn: LossFn | None = None,
    ) -> dict[str, Any]:
        """Adapt every task for ``steps`` steps and score its query set.

        Returns the means ``query_loss`` and ``support_loss`` (floats), and the
        per-task ``query_losses`` (and ``query_metrics`` when ``metric_fn(model,
        x, y)`` is given, e.g. accuracy) as numpy arrays, for confidence intervals.
        """
        _num_tasks(episodes)
        loss_fn = self._loss(loss_fn)
        meta = stop_gradient(self.meta_parameters())
        metric = make_task_loss(self.model, metric_fn) if metric_fn else None

        def one(m, sx, sy, qx, qy):
            adapted, query_loss, support_loss = self.adapt_task(
                m, sx, sy, qx, qy, loss_fn, FUSED_UPDATE, steps=steps, first_order=True
            )
            if metric is None:
                return query_loss, support_loss
            return query_loss, support_loss, metric(adapted, qx, qy)

        results = mx.vmap(one, in_axes=(None, 0, 0, 0, 0))(
            meta, episodes.support_x, episodes.support_y, episodes.query_x, episodes.query_y
        )
        mx.eval(results)
        out = {
            "query_loss": results[0].mean().item(),
            "support_loss": results[1].mean().item(),
            "query_losses": _numpy(results[0]),
        }
        if metric is not None:
            out["query_metrics"] = _numpy(results[2])
        return out

    def _loss(self, loss_fn: LossFn | None) -> LossFn:
        loss_fn = loss_fn if loss_fn is not None else self.loss_fn
        if loss_fn is None:
            raise ValueError(
                f"{self.name}: no loss_fn: pass loss_fn(model, x, y) to the learner "
                "or to meta_train_step"
            )
        return loss_fn

    # ---------------------------------------------------------------- save, load
    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Writes meta-parameters, optimizer state and step to ``path``, atomically.

        ``extra`` (JSON-serialisable) is stored in the metadata, e.g. a task sampler's
        RNG state for resuming; :meth:`load` returns it.
        """
        checkpoint.save(
            path,
            {
                "meta": self.meta_parameters(),
                "optimizer": self.optimizer.state if self.optimizer is not None else {},
            },
            {
                "algorithm": self.name,
                "step": self.step,
                "inner_lr": self.inner_lr,
                "inner_steps": self.inner_steps,
                "extra": extra or {},
            },
        )

    def load(self, path: str | Path) -> dict[str, Any]:
        """Restores a checkpoint written by :meth:`save` for the same algorithm and model;
        returns the ``extra`` metadata saved with it."""
        trees, metadata = checkpoint.load(path)
        if metadata.get("algorithm") != self.name:
            raise ValueError(
                f"{path}: checkpoint is for algorithm {metadata.get('algorithm')!r}, "
                f"this learner is {self.name!r}"
            )
        checkpoint.check_like(path, "meta", trees.get("meta", {}), self.meta_parameters())
        self.set_meta_parameters(trees["meta"])
        if trees.get("optimizer") and self.optimizer is not None:
            self.optimizer.state = trees["optimizer"]
        self.step = int(metadata.get("step", 0))
        self._compiled.clear()  # compiled steps hold the old optimizer state
        return metadata.get("extra", {})


def _num_tasks(episodes: Any) -> int:
    tasks = episodes.support_x.shape[0]
    if tasks < 1:
        raise ValueError("episodes hold no tasks (T=0)")
    return tasks


def _assign(dst: Any, src: Any) -> None:
    """Makes the containers of ``dst`` hold the leaves of ``src`` again, in place (the
    compiled step keeps a reference to them)."""
    if isinstance(dst, dict):
        for key in [k for k in dst if k not in src]:
            del dst[key]
        items = src.items()
    else:
        del dst[len(src) :]
        dst.extend(src[len(dst) :])
        items = enumerate(src)
    for key, value in items:
        current = dst.get(key) if isinstance(dst, dict) else dst[key]
        if (
            isinstance(value, (dict, list))
            and type(current) is type(value)
            and current is not value
        ):
            _assign(current, value)
        else:
            dst[key] = value


def _numpy(a: mx.array):
    import numpy as np

    return np.array(a)
