"""The ``sinusoid`` task family: few-shot regression of sine waves.

The benchmark of Finn et al. (2017), "Model-Agnostic Meta-Learning for Fast
Adaptation of Deep Networks". Each task is a sine wave ``y = A sin(x - phase)``
with amplitude ``A ~ U[0.1, 5]`` and phase ``phase ~ U[0, pi]``, drawn once per
task; its support and query points are ``x ~ U[-5, 5]``, drawn independently.
``x`` and ``y`` have shape ``(K, 1)`` and dtype float32.

A config of this family has ``input_dim == 1`` and ``num_classes`` 0 or 1
(regression). ``task_params`` may override the ranges, each a ``[low, high]``
pair (``low == high`` fixes the value):

- ``amplitude_range``: default ``[0.1, 5.0]``
- ``phase_range``: default ``[0.0, pi]``
- ``x_range``: default ``[-5.0, 5.0]``

Example:
    >>> from metapeft.tasks import TaskConfig, TaskDistribution
    >>> config = TaskConfig("sine", "sinusoid", 0, 1, support_size=10, query_size=10)
    >>> episodes = TaskDistribution(config, seed=0).sample(4)
    >>> episodes.support_x.shape, episodes.support_y.shape
    ((4, 10, 1), (4, 10, 1))
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from metapeft.tasks._checks import check_keys, check_range

if TYPE_CHECKING:
    from metapeft.tasks.config import TaskConfig

__all__ = ["DEFAULT_RANGES", "sample", "validate"]

# The ranges of Finn et al. (2017); task_params may override each one.
DEFAULT_RANGES: dict[str, tuple[float, float]] = {
    "amplitude_range": (0.1, 5.0),
    "phase_range": (0.0, math.pi),
    "x_range": (-5.0, 5.0),
}


def validate(config: TaskConfig) -> None:
    """Check a sinusoid config: ``input_dim == 1`` and well-formed ``task_params``.

    Args:
        config: The config to check.

    Raises:
        ValueError: If ``input_dim`` is not 1, or a task parameter is unknown or
            not a ``[low, high]`` pair of finite numbers.
    """
    where = f"sinusoid task {config.task_id!r}"
    if config.input_dim != 1:
        raise ValueError(f"{where}: input_dim must be 1, got {config.input_dim}")
    check_keys(where, config.task_params, tuple(DEFAULT_RANGES))
    for name, value in config.task_params.items():
        check_range(where, name, value)


def _ranges(config: TaskConfig) -> dict[str, tuple[float, float]]:
    return {
        name: tuple(float(v) for v in config.task_params.get(name, default))
        for name, default in DEFAULT_RANGES.items()
    }


def sample(
    config: TaskConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw one sine-wave task.

    Args:
        config: A validated sinusoid config.
        rng: The generator to draw from (the distribution's).

    Returns:
        ``(support_x, support_y, query_x, query_y)``, float32 arrays of shapes
        ``(support_size, 1)`` and ``(query_size, 1)``.

    Example:
        >>> from metapeft.tasks import TaskConfig
        >>> config = TaskConfig("sine", "sinusoid", 0, 1, support_size=5, query_size=3)
        >>> [a.shape for a in sample(config, np.random.default_rng(0))]
        [(5, 1), (5, 1), (3, 1), (3, 1)]
    """
    ranges = _ranges(config)
    amplitude = rng.uniform(*ranges["amplitude_range"])
    phase = rng.uniform(*ranges["phase_range"])
    n = config.support_size + config.query_size
    x = rng.uniform(*ranges["x_range"], size=(n, 1))
    y = amplitude * np.sin(x - phase)
    x, y = x.astype(np.float32), y.astype(np.float32)
    k = config.support_size
    return x[:k], y[:k], x[k:], y[k:]
