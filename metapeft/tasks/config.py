"""Task configurations: what a task family draws, and how to read them from JSON."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from metapeft.tasks._checks import check_int
from metapeft.tasks.registry import get_family

__all__ = ["TaskConfig", "load_task_configs"]


@dataclass(frozen=True)
class TaskConfig:
    """One kind of task: a family, its sizes and its parameters.

    For a classification family (``digits``) a task is N-way K-shot with
    ``N = num_classes``: ``support_size`` and ``query_size`` are the *total*
    numbers of examples per task, so both must be multiples of ``num_classes``
    (5-way 1-shot with 15 query examples per class is ``support_size=5,
    query_size=75``). For a regression family (``sinusoid``), ``num_classes`` is
    0 or 1 and the sizes are the numbers of points.

    Attributes:
        task_id: A name for this config (unique within a distribution).
        task_family: A registered family: ``"sinusoid"``, ``"digits"`` or your own
            (see :func:`~metapeft.tasks.register_family`).
        num_classes: N for classification; 0 or 1 for regression.
        input_dim: Features per example (1 for ``sinusoid``, 64 for ``digits``).
        support_size: Examples per task to adapt on, >= 1.
        query_size: Examples per task to evaluate on, >= 1.
        task_params: Family options, e.g. ``{"split": "test"}`` for ``digits`` or
            ``{"amplitude_range": [1, 2]}`` for ``sinusoid``. Copied.

    Raises:
        TypeError: If a field has the wrong type.
        ValueError: If a value is out of range, the family is unknown (the message
            lists the known ones), the sizes are not multiples of ``num_classes``,
            or the family rejects the config.

    Example:
        >>> TaskConfig("5w1s", "digits", 5, 64, support_size=5, query_size=75).num_classes
        5
    """

    task_id: str
    task_family: str
    num_classes: int
    input_dim: int
    support_size: int
    query_size: int
    task_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("task_id", "task_family"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise TypeError(f"{name} must be a non-empty str, got {value!r}")
        for name, minimum in (
            ("num_classes", 0),
            ("input_dim", 1),
            ("support_size", 1),
            ("query_size", 1),
        ):
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum))
        if not isinstance(self.task_params, Mapping):
            raise TypeError(f"task_params must be a dict, got {type(self.task_params).__name__}")
        if not all(isinstance(k, str) for k in self.task_params):
            raise TypeError(f"task_params keys must be str, got {list(self.task_params)}")
        object.__setattr__(self, "task_params", copy.deepcopy(dict(self.task_params)))
        family = get_family(self.task_family)
        where = f"task {self.task_id!r} ({self.task_family})"
        if family.classification:
            if self.num_classes < 2:
                raise ValueError(
                    f"{where}: num_classes must be >= 2 for classification, got {self.num_classes}"
                )
            for name in ("support_size", "query_size"):
                size = getattr(self, name)
                if size % self.num_classes:
                    raise ValueError(
                        f"{where}: {name}={size} must be a multiple of "
                        f"num_classes={self.num_classes} (it counts all examples of a task)"
                    )
        elif self.num_classes not in (0, 1):
            raise ValueError(
                f"{where}: num_classes must be 0 or 1 for regression, got {self.num_classes}"
            )
        if family.validate is not None:
            family.validate(self)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON-serialisable if ``task_params`` is).

        Example:
            >>> TaskConfig("sine", "sinusoid", 0, 1, 10, 10).to_dict()["support_size"]
            10
        """
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskConfig:
        """Build a config from a dict of its fields (``task_params`` may be left out).

        Raises:
            ValueError: If a field is missing or unknown (named in the message), or
                as the constructor.
            TypeError: If ``data`` is not a dict, or as the constructor.

        Example:
            >>> TaskConfig.from_dict({"task_id": "sine", "task_family": "sinusoid",
            ...     "num_classes": 0, "input_dim": 1, "support_size": 10,
            ...     "query_size": 10}).task_params
            {}
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"a task must be a dict of fields, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = [k for k in data if k not in names]
        if unknown:
            raise ValueError(f"unknown field {unknown[0]!r}; fields are {', '.join(names)}")
        missing = [n for n in names[:-1] if n not in data]
        if missing:
            raise ValueError(f"missing field {missing[0]!r}")
        return cls(**data)


def load_task_configs(path: str | os.PathLike[str]) -> list[TaskConfig]:
    """Read task configs from a JSON file.

    The file holds a list of tasks, or an object ``{"tasks": [...]}``; each task
    is an object with the fields of :class:`TaskConfig` (``task_params``
    optional)::

        [{"task_id": "sine", "task_family": "sinusoid", "num_classes": 0,
          "input_dim": 1, "support_size": 10, "query_size": 10,
          "task_params": {"amplitude_range": [0.1, 5.0]}}]

    Args:
        path: The JSON file.

    Returns:
        The configs, in file order.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file is not JSON, holds no tasks, or a task is bad; the
            message names the file, the task's index (and id) and the bad field
            (missing, unknown, wrong type or out of range), or a repeated task_id.

    Example:
        >>> import json, tempfile
        >>> task = {"task_id": "sine", "task_family": "sinusoid", "num_classes": 0,
        ...         "input_dim": 1, "support_size": 10, "query_size": 10}
        >>> with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        ...     json.dump({"tasks": [task]}, f)
        >>> [c.task_id for c in load_task_configs(f.name)]
        ['sine']
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})"
        ) from None
    if isinstance(data, dict):
        extra = [k for k in data if k != "tasks"]
        if "tasks" not in data or extra:
            raise ValueError(
                f"{path}: expected a list of tasks or an object with only a 'tasks' list; "
                f"got an object with keys {list(data)}"
            )
        data = data["tasks"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of tasks, got {type(data).__name__}")
    if not data:
        raise ValueError(f"{path}: no tasks")
    configs: list[TaskConfig] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(data):
        where = f"{path}: task {i}"
        if isinstance(entry, dict) and isinstance(entry.get("task_id"), str):
            where += f" ({entry['task_id']!r})"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
        try:
            config = TaskConfig.from_dict(entry)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
        if config.task_id in seen:
            raise ValueError(
                f"{where}: task_id {config.task_id!r} repeats task {seen[config.task_id]}"
            )
        seen[config.task_id] = i
        configs.append(config)
    return configs
