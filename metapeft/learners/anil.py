"""ANIL (Raghu et al. 2020, "Rapid Learning or Feature Reuse?"): almost no inner loop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from metapeft.learners.base import MetaLearner


class ANIL(MetaLearner):
    """MAML whose inner loop adapts only the head; the outer loop trains everything.

    The head is the model's last layer (the last module with trainable parameters)
    unless ``head`` names it: module paths such as ``"layers.4"`` or ``"classifier"``,
    whose parameters (``"layers.4.weight"``, ...) the inner loop adapts. Arguments
    otherwise as :class:`MetaLearner`'s.

    Example:
        >>> import mlx.nn as nn
        >>> model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 1))
        >>> ANIL(model, inner_lr=0.1).head
        ('layers.2',)
    """

    name = "anil"
    first_order = False

    def __init__(
        self,
        model: nn.Module,
        optimizer: optim.Optimizer | None = None,
        *args: Any,
        head: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, optimizer, *args, **kwargs)
        keys = [k for k, _ in tree_flatten(self.model.trainable_parameters())]
        if head is None:
            head = (keys[-1].rpartition(".")[0],)
        elif isinstance(head, str) or not all(isinstance(h, str) for h in head):
            raise TypeError(f"head must be a sequence of module paths (str), got {head!r}")
        self.head = tuple(head)
        missing = [h for h in self.head if not any(_under(k, h) for k in keys)]
        if missing or not self.head:
            raise ValueError(
                f"head {list(self.head)} names no trainable parameters of the model "
                f"(missing: {missing}); trainable: {keys}"
            )

    def inner_keys(self, params: Any) -> set[str]:
        return {k for k, _ in tree_flatten(params) if any(_under(k, h) for h in self.head)}


def _under(key: str, module: str) -> bool:
    """Whether the parameter path ``key`` lies in the module at path ``module``."""
    return module == "" or key == module or key.startswith(module + ".")
