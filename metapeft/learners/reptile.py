"""Reptile (Nichol et al. 2018): move the meta-parameters toward the adapted ones."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from metapeft import ops, reference
from metapeft.learners.base import MetaLearner
from metapeft.learners.core import (
    FUSED_UPDATE,
    REFERENCE_UPDATE,
    LossFn,
    stop_gradient,
    tree_distance,
)


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
    ) -> None:
        if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"epsilon must be a finite float > 0, got {epsilon!r}")
        super().__init__(model, optimizer, inner_lr, inner_steps, batched, compile, loss_fn, fast)
        self.epsilon = float(epsilon)

    def default_optimizer(self) -> None:
        """Reptile's own outer step (``ops.reptile_update``) needs no optimizer."""
        return None

    def outer_step(
        self, meta: dict, data: tuple, loss_fn: LossFn, batched: bool
    ) -> tuple[dict, dict[str, mx.array]]:
        params = stop_gradient(meta["params"])
        if batched:
            adapted, query, support = mx.vmap(
                lambda m, a, b, c, d: self.adapt_task(m, a, b, c, d, loss_fn, FUSED_UPDATE),
                in_axes=(None, 0, 0, 0, 0),
            )({"params": params}, *data)
        else:
            adapted, query, support = self._naive_adapt({"params": params}, data, loss_fn)
        diff = mx.vmap(tree_distance, in_axes=(0, None))(adapted, params).mean()
        metrics = {"support_loss": support.mean(), "query_loss": query.mean(), "param_diff": diff}
        if self.optimizer is not None:
            grads = tree_map(lambda p, a: p - a.mean(axis=0), params, adapted)
            return self.optimizer.apply_gradients({"params": grads}, meta), metrics
        update = ops.reptile_update if batched else reference.reptile_update
        return {"params": update(params, adapted, self.epsilon)}, metrics

    def _naive_adapt(self, meta: dict, args: tuple, loss_fn: LossFn) -> tuple:
        """The reference: one task at a time with stock MLX updates, results stacked."""
        results = []
        for t in range(args[0].shape[0]):
            results.append(self.adapt_task(meta, *(a[t] for a in args), loss_fn, REFERENCE_UPDATE))
            mx.eval(results[-1])
        adapted = tree_map(lambda *leaves: mx.stack(leaves), *[r[0] for r in results])
        return adapted, mx.stack([r[1] for r in results]), mx.stack([r[2] for r in results])
