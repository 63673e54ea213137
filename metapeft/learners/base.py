"""MetaLearner: what every algorithm shares (state, the outer step, adapt, evaluate, save).

An algorithm is a pure function, :meth:`MetaLearner.meta_update`, from the
meta-parameters and a meta-batch to its update (the meta-gradient; Reptile's adapted
parameters) and the step's metrics, and :meth:`MetaLearner.apply_update`, which
applies it. :meth:`MetaLearner.outer_step` puts the two together, with the update
and metrics averaged across the ranks in between when the learner has a
:attr:`~MetaLearner.group`. The class around it applies it (compiled, with the
optimizer state passed in and out explicitly), commits the result only when it is
finite, and saves and loads.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from metapeft import checkpoint, distributed
from metapeft.learners import inner
from metapeft.learners.core import (
    LossFn,
    inner_loop,
    make_task_loss,
    merge_trees,
    split_tree,
    stop_gradient,
    tree_distance,
    tree_total,
)
from metapeft.learners.mapping import ALL_AT_ONCE, ONE_AT_A_TIME, TaskMap
from metapeft.nn.fast import use_fast_layers

# Per-task results of one task's meta-objective: (query loss, support loss, distance moved).
TaskResult = tuple[mx.array, mx.array, mx.array]


class MetaLearner:
    """Base of the meta-learners: holds the model, the outer optimizer and the step count.

    Only the model's trainable parameters are meta-learned (after
    :func:`metapeft.nn.apply_lora`, only the adapters). The inner loop adapts
    every task of a meta-batch at once (``mx.vmap`` over the task axis, fused
    :func:`metapeft.ops.task_sgd` updates); ``batched=False`` adapts them one at a
    time instead (a Python loop, gradients accumulated), which gives the same
    numbers and holds one task's graph in memory.

    Args:
        model: Any ``mlx.nn.Module``; its trainable parameters are the meta-parameters.
        optimizer: The outer optimizer, any ``mlx.optimizers.Optimizer``.
        inner_lr: Step size of the inner loop.
        inner_steps: Inner steps per task during meta-training.
        batched: All tasks at once (``mx.vmap``) or one at a time.
        compile: Wrap the meta-step in ``mx.compile`` (batched only).
        loss_fn: ``loss_fn(model, x, y) -> scalar`` for one task (MLX's convention).
            It may instead be given to :meth:`meta_train_step`, which remembers it
            for :meth:`adapt` and :meth:`evaluate`.
        fast: Put the model on metapeft's fast path first
            (:func:`metapeft.nn.use_fast_layers`: BLAS products, fused attention,
            SwiGLU and tied output layers, in place, weights shared and results
            unchanged); False keeps the model's own layers.
        inner_optimizer: The inner loop's optimizer (:mod:`metapeft.learners.inner`):
            ``inner.sgd()`` (the default), ``inner.momentum()``, ``inner.adam()``.
    """

    name = "meta_learner"
    first_order = False
    # The training config's field that holds this algorithm's outer step size, and
    # that step size when none is given.
    outer_lr_setting = "outer_lr"
    default_outer_lr = 1e-3

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
        inner_optimizer: inner.InnerOptimizer | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an mlx.nn.Module, got {type(model).__name__}")
        if inner_steps < 1:
            raise ValueError(f"inner_steps must be >= 1, got {inner_steps}")
        if not (isinstance(inner_lr, (int, float)) and math.isfinite(inner_lr) and inner_lr > 0):
            raise ValueError(f"inner_lr must be a finite float > 0, got {inner_lr!r}")
        if inner_optimizer is not None and not isinstance(inner_optimizer, inner.InnerOptimizer):
            raise TypeError(
                "inner_optimizer must be an InnerOptimizer (metapeft.learners.inner.sgd(), "
                f"momentum(), adam()), got {type(inner_optimizer).__name__}"
            )
        if fast:
            # In place. A model that is itself one swappable layer (a bare nn.Linear)
            # is kept: the caller's object is the one that learns.
            use_fast_layers(model)
        if not tree_flatten(model.trainable_parameters()):
            raise ValueError("model has no trainable parameters to meta-learn")
        self.model = model
        self.optimizer = optimizer if optimizer is not None else self.default_optimizer()
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.inner_optimizer = inner_optimizer if inner_optimizer is not None else inner.sgd()
        self.tasks: TaskMap = ALL_AT_ONCE if batched else ONE_AT_A_TIME
        self.loss_fn = loss_fn
        self.step = 0
        self._use_compile = compile
        self._compiled: tuple[LossFn, Any] | None = None
        self._group: mx.distributed.Group | None = None

    @classmethod
    def from_settings(cls, model: nn.Module, outer_lr: float, **kwargs: Any) -> MetaLearner:
        """The learner with its usual outer optimizer at step size ``outer_lr``:
        bias-corrected Adam, as published MAML (``kwargs`` as the constructor's)."""
        return cls(model, optim.Adam(outer_lr, bias_correction=True), **kwargs)

    def default_optimizer(self) -> optim.Optimizer | None:
        """The outer optimizer when none is given: bias-corrected Adam, as published MAML."""
        return optim.Adam(self.default_outer_lr, bias_correction=True)

    @property
    def batched(self) -> bool:
        """All tasks of a meta-batch at once (True) or one at a time."""
        return self.tasks.vectorized

    @batched.setter
    def batched(self, value: bool) -> None:
        self.tasks = ALL_AT_ONCE if value else ONE_AT_A_TIME
        self._compiled = None

    @property
    def group(self) -> mx.distributed.Group | None:
        """The ranks this learner meta-trains with (an ``mx.distributed`` group, e.g.
        ``mx.distributed.init()``), or None: this process alone (the default).

        With a group of several ranks, every rank gives :meth:`meta_train_step` and
        :meth:`evaluate` the whole meta-batch and adapts its share of the tasks
        (:func:`metapeft.distributed.shard`); the update and the metrics are averaged
        across the ranks inside the meta-step, so all commit the same meta-parameters.
        A group of one is None.
        """
        return self._group

    @group.setter
    def group(self, group: mx.distributed.Group | None) -> None:
        self._group = group if group is not None and group.size() > 1 else None
        self._compiled = None

    # ------------------------------------------------------------ meta-parameters
    def meta_parameters(self) -> dict[str, Any]:
        """The tree the outer optimizer updates: ``{"params": ...}`` (and more in subclasses)."""
        return {"params": self.model.trainable_parameters()}

    def set_meta_parameters(self, meta: dict[str, Any]) -> None:
        self.model.update(meta["params"])

    def inner_rates(self, meta: dict[str, Any]) -> Any:
        """The inner learning rate(s) given the meta-parameters (a float, or a tree)."""
        return self.inner_lr

    def inner_keys(self, params: Any) -> set[str] | None:
        """The flat paths (``"layers.2.weight"``) of the parameters the inner loop
        adapts; None: all of them."""
        return None

    # ---------------------------------------------------------------- one task
    def adapt_task(
        self,
        meta: dict[str, Any],
        sx: mx.array,
        sy: mx.array,
        qx: mx.array,
        qy: mx.array,
        loss_fn: LossFn,
        steps: int | None = None,
        first_order: bool | None = None,
    ) -> tuple[Any, mx.array, mx.array]:
        """Adapt to one task's support set: (adapted params, query loss, support loss before)."""
        task_loss = make_task_loss(self.model, loss_fn)
        params, rates = meta["params"], self.inner_rates(meta)
        keys = self.inner_keys(params)
        fixed: dict[str, Any] = {}
        adapt_loss = task_loss
        if keys is not None:
            params, fixed = split_tree(params, keys)
            if not isinstance(rates, (int, float)):
                rates = split_tree(rates, keys)[0]

            def adapt_loss(p: Any, x: mx.array, y: mx.array) -> mx.array:
                return task_loss(merge_trees(fixed, p), x, y)

        adapted, support_loss = inner_loop(
            adapt_loss,
            params,
            sx,
            sy,
            rates,
            self.inner_steps if steps is None else steps,
            self.inner_optimizer,
            self.first_order if first_order is None else first_order,
        )
        if keys is not None:
            adapted = merge_trees(fixed, adapted)
        return adapted, task_loss(adapted, qx, qy), support_loss

    def task_objective(
        self,
        meta: dict[str, Any],
        sx: mx.array,
        sy: mx.array,
        qx: mx.array,
        qy: mx.array,
        loss_fn: LossFn,
    ) -> TaskResult:
        """One task's (query loss after adaptation, support loss before, distance moved)."""
        adapted, query_loss, support_loss = self.adapt_task(meta, sx, sy, qx, qy, loss_fn)
        return query_loss, support_loss, tree_distance(adapted, meta["params"])

    # --------------------------------------------------------------- meta-step
    def outer_step(
        self, meta: dict, opt_state: Any, data: tuple, loss_fn: LossFn
    ) -> tuple[dict, Any, dict[str, mx.array]]:
        """One meta-step as a pure function: ``(meta-parameters, optimizer state,
        this rank's tasks) -> (new meta-parameters, new state, metrics)``, lazily:
        :meth:`meta_update`, averaged across the :attr:`group`'s ranks (the update
        and the metrics together, :func:`metapeft.distributed.average`), then
        :meth:`apply_update`."""
        update, metrics = self.meta_update(meta, data, loss_fn)
        if self._group is not None:
            update, metrics = distributed.average((update, metrics), self._group)
        new_meta, new_state = self.apply_update(update, meta, opt_state)
        return new_meta, new_state, metrics

    def meta_update(
        self, meta: dict, data: tuple, loss_fn: LossFn
    ) -> tuple[Any, dict[str, mx.array]]:
        """The algorithm, a pure function: ``(meta-parameters, tasks) -> (update,
        metrics)``, where the update is a mean over the tasks (so that averaging it
        across ranks gives the mean over all their tasks) and the metrics are the mean
        ``support_loss``, ``query_loss`` and ``param_diff``. Gradient-based by
        default: the update is the gradient of the mean query loss after adaptation."""
        (query, support, diff), grads = self.tasks.value_and_grad(
            lambda m, *task: self.task_objective(m, *task, loss_fn), meta, data
        )
        return grads, {"support_loss": support, "query_loss": query, "param_diff": diff}

    def apply_update(self, update: Any, meta: dict, opt_state: Any) -> tuple[dict, Any]:
        """``(new meta-parameters, new optimizer state)`` from the update of
        :meth:`meta_update`: by default the outer optimizer's step on it."""
        return self.apply_optimizer(update, meta, opt_state)

    def apply_optimizer(self, grads: Any, meta: Any, opt_state: Any) -> tuple[Any, Any]:
        """The outer optimizer's step as a pure function of its state: it works on a
        copy of ``opt_state``'s containers and leaves the optimizer's own state alone."""
        with _working_state(self.optimizer, opt_state) as opt:
            return opt.apply_gradients(grads, meta), opt.state

    def optimizer_state(self, meta: Any) -> Any:
        """The outer optimizer's state initialised for the meta-parameters ``meta`` ({}
        without an optimizer); its own state is left as it is until a step commits."""
        opt = self.optimizer
        if opt is None:
            return {}
        if all(key in opt.state for key in meta):  # initialised for these meta-parameters
            return opt.state
        with _working_state(opt, opt.state):
            opt.init(meta)
            return opt.state

    def meta_train_step(self, episodes: Any, loss_fn: LossFn | None = None) -> dict[str, float]:
        """One outer step on a meta-batch; returns ``support_loss``, ``query_loss``, ``param_diff``.

        ``support_loss`` is the mean support loss before adaptation, ``query_loss``
        the mean query loss after it, ``param_diff`` the mean distance the inner
        loop moved the parameters. A non-finite loss or update raises
        ``FloatingPointError`` and leaves the meta-parameters and the optimizer
        state as they were. With a :attr:`group`, ``episodes`` is the whole
        meta-batch, its ``T`` tasks divisible by the number of ranks (else
        ``ValueError``), and the metrics are means over all of them.
        """
        _num_tasks(episodes)
        if self._group is not None:
            episodes = distributed.shard(episodes, self._group)
        loss_fn = self._loss(loss_fn)
        self.loss_fn = loss_fn
        data = (episodes.support_x, episodes.support_y, episodes.query_x, episodes.query_y)
        meta = self.meta_parameters()
        new_meta, new_state, metrics = self._step_function(loss_fn)(
            meta, self.optimizer_state(meta), *data
        )
        mx.eval(new_meta, new_state, metrics)
        values = {k: v.item() for k, v in metrics.items() if k != "finite"}
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if not metrics["finite"].item():
            bad.append("meta-parameters")
        if bad:
            raise FloatingPointError(
                f"{self.name}: non-finite {', '.join(bad)} at meta-step {self.step + 1}; "
                f"meta-parameters and optimizer state kept from step {self.step}"
            )
        self.set_meta_parameters(new_meta)
        if self.optimizer is not None:
            self.optimizer.state = new_state
        self.step += 1
        return values

    def _step_function(self, loss_fn: LossFn):
        """:meth:`outer_step` with a finiteness flag, compiled when the task mapping
        allows; the last one is kept, for the last ``loss_fn``."""
        if self._compiled is not None and self._compiled[0] is loss_fn:
            return self._compiled[1]

        def step(meta, opt_state, *data):
            new_meta, new_state, metrics = self.outer_step(meta, opt_state, data, loss_fn)
            total = tree_total(leaf for _, leaf in tree_flatten(new_meta))
            return new_meta, new_state, {**metrics, "finite": mx.isfinite(total)}

        if self._use_compile and self.tasks.compiles:
            step = mx.compile(step)
        self._compiled = (loss_fn, step)
        return step

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
        meta = stop_gradient(self.meta_parameters())
        loss_fn = self._loss(loss_fn)
        # The query set is the support set: its loss is not used.
        adapted, _, _ = self.adapt_task(
            meta, support_x, support_y, support_x, support_y, loss_fn, steps, first_order=True
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
        With a :attr:`group`, each rank adapts its share of the tasks (any number of
        them) and every rank returns the results of all.
        """
        num_tasks = _num_tasks(episodes)
        loss_fn = self._loss(loss_fn)
        meta = stop_gradient(self.meta_parameters())
        metric = make_task_loss(self.model, metric_fn) if metric_fn else None

        def one(m, sx, sy, qx, qy):
            adapted, query_loss, support_loss = self.adapt_task(
                m, sx, sy, qx, qy, loss_fn, steps=steps, first_order=True
            )
            if metric is None:
                return query_loss, support_loss
            return query_loss, support_loss, metric(adapted, qx, qy)

        data = (episodes.support_x, episodes.support_y, episodes.query_x, episodes.query_y)
        if self._group is None:
            results = self.tasks.stack(one, meta, data)
        else:
            start, stop = distributed.task_range(num_tasks, self._group)
            width = 2 if metric is None else 3
            mine = mx.zeros((0, width))
            if stop > start:  # fewer tasks than ranks leave some ranks none
                mine = mx.stack(self.tasks.stack(one, meta, tuple(a[start:stop] for a in data)), 1)
            everyone = distributed.gather_tasks(mine, num_tasks, self._group)
            results = tuple(everyone[:, i] for i in range(width))
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
        return metadata.get("extra", {})


def _num_tasks(episodes: Any) -> int:
    tasks = episodes.support_x.shape[0]
    if tasks < 1:
        raise ValueError("episodes hold no tasks (T=0)")
    return tasks


@contextmanager
def _working_state(opt: optim.Optimizer, state: Any) -> Iterator[optim.Optimizer]:
    """``opt`` working on a copy of ``state``'s containers (MLX optimizers update their
    state dicts in place); its own state is back when the block ends."""
    committed = opt.state
    opt.state = tree_map(lambda x: x, state)
    try:
        yield opt
    finally:
        opt.state = committed


def _numpy(a: mx.array):
    import numpy as np

    return np.array(a)
