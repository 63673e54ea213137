"""TaskDistribution: draws meta-batches of tasks from a set of configs."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from metapeft.tasks._checks import check_int
from metapeft.tasks.config import TaskConfig
from metapeft.tasks.episodes import Episodes
from metapeft.tasks.registry import TaskFamily, get_family

__all__ = ["TaskDistribution"]

# Fields every config of one distribution shares, so that tasks stack on one axis.
SHARED_FIELDS = ("task_family", "input_dim", "num_classes", "support_size", "query_size")


class SeededSampler:
    """A task sampler whose draws all come from one numpy ``Generator``, ``self.rng``:
    its state can be saved with a checkpoint and restored to resume exactly."""

    rng: np.random.Generator

    def rng_state(self) -> dict[str, Any]:
        """The generator's state, as a JSON-serialisable dict (for checkpoints).

        Example:
            >>> from metapeft.tasks import TaskConfig, TaskDistribution
            >>> tasks = TaskDistribution(TaskConfig("sine", "sinusoid", 0, 1, 5, 5))
            >>> state = tasks.rng_state()
            >>> a = tasks.sample(2)
            >>> tasks.set_rng_state(json.loads(json.dumps(state)))
            >>> bool(mx.array_equal(tasks.sample(2).query_y, a.query_y))
            True
        """
        return copy.deepcopy(self.rng.bit_generator.state)

    def set_rng_state(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`rng_state`; sampling then continues identically.

        Args:
            state: A dict returned by :meth:`rng_state` (possibly via JSON).

        Raises:
            ValueError: If ``state`` is not such a dict.
        """
        expected = type(self.rng.bit_generator).__name__
        if not isinstance(state, dict) or state.get("bit_generator") != expected:
            raise ValueError(
                f"rng state must be a dict from rng_state() with bit_generator "
                f"{expected!r}, got {_short(state)}"
            )
        bit_generator = type(self.rng.bit_generator)()
        try:
            bit_generator.state = copy.deepcopy(state)
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"invalid rng state {_short(state)}: {e}") from None
        self.rng = np.random.Generator(bit_generator)


class TaskDistribution(SeededSampler):
    """A distribution over tasks: draws meta-batches as :class:`Episodes`.

    Each task of a meta-batch picks one of the configs uniformly at random and is
    drawn by that config's family, all with one numpy ``Generator`` seeded by
    ``seed``: the same seed gives the same episodes. ``x`` is float32; ``y`` is
    float32 for regression and int32 (labels ``0 .. N-1``) for classification.

    Args:
        configs: One :class:`TaskConfig` or a non-empty sequence of them. All share
            ``task_family``, ``input_dim``, ``num_classes``, ``support_size`` and
            ``query_size`` (so tasks stack); ``task_id`` values are unique.
        seed: Seed of the generator, an int >= 0.

    Raises:
        TypeError: If ``configs`` holds something other than ``TaskConfig``, or
            ``seed`` is not an int.
        ValueError: If there are no configs, two disagree on a shared field (the
            message names the field and both ``task_id`` values), a ``task_id``
            repeats, ``seed`` is negative, or the family rejects a config (e.g. a
            digits split with fewer than ``num_classes`` classes).
        ImportError: If the family needs an optional dependency that is missing.

    Example:
        >>> config = TaskConfig("sine", "sinusoid", 0, 1, support_size=10, query_size=10)
        >>> tasks = TaskDistribution(config, seed=0)
        >>> episodes = tasks.sample(25)
        >>> episodes.support_x.shape, episodes.query_y.dtype
        ((25, 10, 1), mlx.core.float32)
    """

    def __init__(self, configs: TaskConfig | Sequence[TaskConfig], seed: int = 0) -> None:
        if isinstance(configs, TaskConfig):
            configs = [configs]
        if isinstance(configs, (str, bytes)) or not isinstance(configs, Sequence):
            raise TypeError(
                f"configs must be a TaskConfig or a sequence of them, got {type(configs).__name__}"
            )
        if not configs:
            raise ValueError("configs is empty: a distribution needs at least one TaskConfig")
        for i, config in enumerate(configs):
            if not isinstance(config, TaskConfig):
                raise TypeError(f"configs[{i}] must be a TaskConfig, got {type(config).__name__}")
        first = configs[0]
        seen: dict[str, int] = {}
        for i, config in enumerate(configs):
            for name in SHARED_FIELDS:
                a, b = getattr(first, name), getattr(config, name)
                if a != b:
                    raise ValueError(
                        f"configs disagree on {name}: task {first.task_id!r} has {a!r}, "
                        f"task {config.task_id!r} has {b!r}"
                    )
            if config.task_id in seen:
                raise ValueError(
                    f"task_id {config.task_id!r} repeats (configs[{seen[config.task_id]}] "
                    f"and configs[{i}])"
                )
            seen[config.task_id] = i
        self._configs = tuple(configs)
        self._family: TaskFamily = get_family(first.task_family)
        if self._family.prepare is not None:
            for config in self._configs:
                self._family.prepare(config)
        self._seed = check_int("seed", seed, 0)
        self.rng = np.random.default_rng(self._seed)

    @property
    def configs(self) -> tuple[TaskConfig, ...]:
        """The configs tasks are drawn from."""
        return self._configs

    @property
    def seed(self) -> int:
        """The seed the distribution was made with."""
        return self._seed

    @property
    def family(self) -> str:
        """The task family shared by the configs."""
        return self._family.name

    @property
    def input_dim(self) -> int:
        """Features per example."""
        return self._configs[0].input_dim

    @property
    def num_classes(self) -> int:
        """N for classification; 0 or 1 for regression."""
        return self._configs[0].num_classes

    @property
    def support_size(self) -> int:
        """Support examples per task."""
        return self._configs[0].support_size

    @property
    def query_size(self) -> int:
        """Query examples per task."""
        return self._configs[0].query_size

    def __repr__(self) -> str:
        ids = ", ".join(repr(c.task_id) for c in self._configs)
        return f"TaskDistribution(family={self.family!r}, tasks=[{ids}], seed={self._seed})"

    def sample(self, num_tasks: int) -> Episodes:
        """Draw a meta-batch of ``num_tasks`` tasks.

        Args:
            num_tasks: Tasks to draw, >= 1.

        Returns:
            :class:`Episodes` with ``support_x`` of shape ``(num_tasks,
            support_size, input_dim)`` (float32), ``support_y`` of shape
            ``(num_tasks, support_size)`` (int32) for classification or
            ``(num_tasks, support_size, ...)`` (float32) for regression, and
            likewise for the query set.

        Raises:
            TypeError: If ``num_tasks`` is not an int.
            ValueError: If ``num_tasks < 1``, or a family returned arrays of the
                wrong shape or labels out of range (named in the message).

        Example:
            >>> config = TaskConfig("sine", "sinusoid", 0, 1, 5, 5)
            >>> TaskDistribution(config, seed=1).sample(3).num_tasks
            3
        """
        num_tasks = check_int("num_tasks", num_tasks, 1)
        picks = self.rng.integers(len(self._configs), size=num_tasks)
        drawn = [self._draw(self._configs[i]) for i in picks]
        stacked = [np.stack([task[j] for task in drawn]) for j in range(4)]
        return Episodes(*(mx.array(a) for a in stacked))

    def _draw(self, config: TaskConfig) -> list[np.ndarray]:
        """One task of ``config``, checked and cast to the documented dtypes."""
        out = self._family.sample(config, self.rng)
        where = f"task family {self.family!r} (task {config.task_id!r})"
        if not isinstance(out, (tuple, list)) or len(out) != 4:
            raise ValueError(f"{where} must return (support_x, support_y, query_x, query_y)")
        arrays = [np.asarray(a) for a in out]
        y_tail = arrays[1].shape[1:]
        for j, (name, size) in enumerate(
            [
                ("support_x", config.support_size),
                ("support_y", config.support_size),
                ("query_x", config.query_size),
                ("query_y", config.query_size),
            ]
        ):
            a = arrays[j]
            want = (size, config.input_dim) if name.endswith("x") else (size, *y_tail)
            if a.shape != want:
                raise ValueError(f"{where} returned {name} of shape {a.shape}, expected {want}")
        if self._family.classification:
            for j, name in ((1, "support_y"), (3, "query_y")):
                y = arrays[j]
                if not np.issubdtype(y.dtype, np.integer):
                    raise ValueError(f"{where} returned {name} of dtype {y.dtype}, not integer")
                if y.size and (y.min() < 0 or y.max() >= config.num_classes):
                    raise ValueError(
                        f"{where} returned {name} with labels outside 0..{config.num_classes - 1}"
                    )
            y_dtype = np.int32
        else:
            y_dtype = np.float32
        return [
            arrays[0].astype(np.float32, copy=False),
            arrays[1].astype(y_dtype, copy=False),
            arrays[2].astype(np.float32, copy=False),
            arrays[3].astype(y_dtype, copy=False),
        ]


def _short(value: Any) -> str:
    text = json.dumps(value, default=repr) if isinstance(value, dict) else repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
