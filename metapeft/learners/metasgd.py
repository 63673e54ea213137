"""Meta-SGD (Li et al. 2017): MAML that also meta-learns a learning rate per parameter."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx.utils import tree_map

from metapeft.learners.base import MetaLearner


class MetaSGD(MetaLearner):
    """Meta-SGD: the inner step is ``params - lr * grads`` with ``lr`` a tree of
    per-parameter rates (initialised to ``inner_lr``) learned by the outer optimizer.

    The rates are meta-parameters, not optimizer state: they are saved with the
    parameters and returned by :meth:`meta_parameters` under ``"lr"``.
    """

    name = "metasgd"
    first_order = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lrs = tree_map(
            lambda p: mx.full(p.shape, self.inner_lr, dtype=mx.float32),
            self.model.trainable_parameters(),
        )

    def meta_parameters(self) -> dict[str, Any]:
        return {"params": self.model.trainable_parameters(), "lr": self.lrs}

    def set_meta_parameters(self, meta: dict[str, Any]) -> None:
        super().set_meta_parameters(meta)
        self.lrs = meta["lr"]

    def inner_rates(self, meta: dict[str, Any]) -> Any:
        return meta["lr"]
