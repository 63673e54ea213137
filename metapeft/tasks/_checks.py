"""Small validation helpers shared by the task modules (not public API)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int, if it is one (not a bool) and ``>= minimum``."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = value.__index__()
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_keys(where: str, params: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    """Raise ValueError naming any key of ``params`` outside ``allowed``."""
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        known = ", ".join(allowed) if allowed else "none"
        raise ValueError(f"{where}: unknown task_params {unknown}; known: {known}")


def check_range(where: str, name: str, value: Any) -> tuple[float, float]:
    """A ``[low, high]`` pair of finite numbers with ``low <= high``, as floats."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"{where}: task_params['{name}'] must be [low, high], got {value!r}")
    low, high = value
    for v in (low, high):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(
                f"{where}: task_params['{name}'] must hold two finite numbers, got {value!r}"
            )
    if low > high:
        raise ValueError(f"{where}: task_params['{name}'] must have low <= high, got {value!r}")
    return float(low), float(high)
