"""Reptile (Nichol et al. 2018): move the meta-parameters toward the adapted ones."""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from metapeft import ops
from metapeft.learners.base import MetaLearner
from metapeft.learners.core import LossFn, stop_gradient, tree_distance
from metapeft.learners.inner import InnerOptimizer


class Reptile(MetaLearner):
    """Reptile: adapt every task for ``inner_steps`` SGD steps on its support set, then
    ``params += epsilon * (mean over tasks of adapted - params)``.

    With no ``optimizer`` the outer step is the fused :func:`metapeft.ops.reptile_update`;
    with one, ``params - mean(adapted)`` is handed to it as the gradient (e.g. Adam).
    No second-order graph is built.

    Example:
        >>> import mlx.nn as nn
        >>> model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 1))
        >>> learner = Reptile(model, epsilon=0.1, inner_lr=0.02, inner_steps=5)
    """

    name = "reptile"
    first_order = True
    outer_lr_setting = "epsilon"
    default_outer_lr = 0.1

    def __init__(
        self,
        model: nn.Module,
        optimizer: optim.Optimizer | None = None,
        epsilon: float = 0.1,
        inner_lr: float = 0.02,
        inner_steps: int = 5,
        batched: bool = True,
        compile: bool = True,
        loss_fn: LossFn | None = None,
        fast: bool = True,
        inner_optimizer: InnerOptimizer | None = None,
    ) -> None:
        if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"epsilon must be a finite float > 0, got {epsilon!r}")
        super().__init__(
            model,
            optimizer,
            inner_lr,
            inner_steps,
            batched,
            compile,
            loss_fn,
            fast,
            inner_optimizer,
        )
        self.epsilon = float(epsilon)

    @classmethod
    def from_settings(cls, model: nn.Module, outer_lr: float, **kwargs: Any) -> Reptile:
        """Reptile with its own outer step, ``epsilon = outer_lr``."""
        return cls(model, epsilon=outer_lr, **kwargs)

    def default_optimizer(self) -> None:
        """Reptile's own outer step (``ops.reptile_update``) needs no optimizer."""
        return None

    def meta_update(
        self, meta: dict, data: tuple, loss_fn: LossFn
    ) -> tuple[Any, dict[str, mx.array]]:
        """The tasks' adapted parameters, stacked on a task axis (with a :attr:`group`,
        their mean, on an axis of one: one copy of the parameters crosses between the
        ranks); with an outer optimizer, its gradient ``params - mean(adapted)``."""
        params = stop_gradient(meta["params"])
        adapted, query, support = self.tasks.stack(
            lambda m, *task: self.adapt_task(m, *task, loss_fn), {"params": params}, data
        )
        diff = mx.vmap(tree_distance, in_axes=(0, None))(adapted, params).mean()
        metrics = {"support_loss": support.mean(), "query_loss": query.mean(), "param_diff": diff}
        if self.optimizer is not None:
            return {"params": tree_map(lambda p, a: p - a.mean(axis=0), params, adapted)}, metrics
        if self.group is not None:
            adapted = tree_map(lambda a: a.mean(axis=0, keepdims=True), adapted)
        return adapted, metrics

    def apply_update(self, update: Any, meta: dict, opt_state: Any) -> tuple[dict, Any]:
        """Without an optimizer, the fused ``params + epsilon * (mean(adapted) - params)``;
        with one, its step."""
        if self.optimizer is None:
            params = stop_gradient(meta["params"])
            return {"params": ops.reptile_update(params, update, self.epsilon)}, opt_state
        return self.apply_optimizer(update, meta, opt_state)
