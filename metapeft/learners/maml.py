"""MAML (Finn et al. 2017) and its first-order approximation FOMAML."""

from __future__ import annotations

from metapeft.learners.base import MetaLearner


class MAML(MetaLearner):
    """Model-agnostic meta-learning, second order: the meta-gradient flows through
    the inner SGD steps (``mx.grad`` through :func:`metapeft.ops.task_sgd`).

    Example:
        >>> import mlx.nn as nn, mlx.optimizers as optim
        >>> model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 1))
        >>> learner = MAML(model, optim.Adam(1e-3, bias_correction=True), inner_lr=0.01)
    """

    name = "maml"
    first_order = False


class FOMAML(MetaLearner):
    """First-order MAML: the inner gradients are treated as constants, so the
    meta-gradient is the query gradient at the adapted parameters."""

    name = "fomaml"
    first_order = True
