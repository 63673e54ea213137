"""Shared utilities: the EfficientAI-MLX toolkit's when it is importable, metapeft's own otherwise.

Three names, each resolved when first used (never at import):

=================  ==========================================  =================================
name               the toolkit's                               metapeft's own
=================  ==========================================  =================================
``setup_logging``  ``utils.logging_utils.setup_logging``       :func:`setup_metapeft_logging`
``ConfigManager``  ``utils.config_manager.ConfigManager``      :class:`MetaConfigManager`
``BenchmarkRunner``  ``utils.benchmark_runner.BenchmarkRunner``  ``metapeft.bench.BenchmarkRunner``
=================  ==========================================  =================================

The toolkit counts as importable when its module imports and has the name; a
toolkit module that is present but fails to import raises, it is not skipped.

Example:
    >>> from metapeft import shared
    >>> shared.source("ConfigManager")  # doctest: +SKIP
    'metapeft'
    >>> logger = shared.setup_logging(log_level="INFO")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any, Literal

TOOLKIT: dict[str, tuple[str, str]] = {
    "setup_logging": ("utils.logging_utils", "setup_logging"),
    "ConfigManager": ("utils.config_manager", "ConfigManager"),
    "BenchmarkRunner": ("utils.benchmark_runner", "BenchmarkRunner"),
}
OWN: dict[str, tuple[str, str]] = {
    "setup_logging": ("metapeft.shared", "setup_metapeft_logging"),
    "ConfigManager": ("metapeft.shared", "MetaConfigManager"),
    "BenchmarkRunner": ("metapeft.bench", "BenchmarkRunner"),
}


def _toolkit(name: str) -> Any | None:
    """The toolkit's object for ``name``, or ``None`` when the toolkit is not installed."""
    module_name, attribute = TOOLKIT[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        parts = module_name.split(".")
        if e.name in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}:
            return None
        raise
    return getattr(module, attribute, None)


def source(name: str) -> Literal["toolkit", "metapeft"]:
    """Whose ``name`` (``setup_logging``, ``ConfigManager``, ``BenchmarkRunner``) is used."""
    if name not in TOOLKIT:
        raise KeyError(f"no shared utility {name!r}; shared utilities: {', '.join(TOOLKIT)}")
    return "toolkit" if _toolkit(name) is not None else "metapeft"


def resolve(name: str) -> Any:
    """The toolkit's ``name`` when importable, else metapeft's own (imported only then)."""
    found = _toolkit(name) if name in TOOLKIT else None
    if found is not None:
        return found
    if name not in OWN:
        raise KeyError(f"no shared utility {name!r}; shared utilities: {', '.join(TOOLKIT)}")
    module_name, attribute = OWN[name]
    return getattr(importlib.import_module(module_name), attribute)


def __getattr__(name: str) -> Any:
    if name in TOOLKIT:
        return resolve(name)
    raise AttributeError(f"module 'metapeft.shared' has no attribute {name!r}")


# ------------------------------------------------------------------- metapeft's own

_HANDLER_MARK = "_metapeft_shared"


def setup_metapeft_logging(
    log_level: str = "INFO", log_file: str | os.PathLike[str] | None = None
) -> logging.Logger:
    """Configures the ``metapeft`` logger (console, and ``log_file`` if given); returns it.

    Calling it again replaces the handlers it added before.

    Example:
        >>> setup_metapeft_logging("DEBUG").name
        'metapeft'
    """
    logger = logging.getLogger("metapeft")
    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        raise ValueError(f"unknown log level {log_level!r}")
    for handler in [h for h in logger.handlers if getattr(h, _HANDLER_MARK, False)]:
        logger.removeHandler(handler)
        handler.close()
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for handler in handlers:
        setattr(handler, _HANDLER_MARK, True)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    return logger


class MetaConfigManager:
    """A config file read as the toolkit's ``ConfigManager`` reads one, validated as a
    :class:`~metapeft.config.MetaLearningConfig` (profiles, ``METAPEFT_*`` environment).

    Args:
        config_path: The YAML config.
        profile: The profile to apply; ``None`` for the base.

    Raises:
        ConfigError: As :meth:`MetaLearningConfig.from_yaml`.

    Example:
        >>> from metapeft.config import packaged_config
        >>> manager = MetaConfigManager(packaged_config("sinusoid_maml"), "dev")
        >>> manager.get("training.num_iterations")
        200
    """

    def __init__(self, config_path: str | os.PathLike[str], profile: str | None = None) -> None:
        from metapeft.config import MetaLearningConfig

        self.config_path = Path(config_path)
        self.profile = profile
        self.config = MetaLearningConfig.from_yaml(self.config_path, profile)

    def get(self, key: str, default: Any = None) -> Any:
        """The value at a dotted ``key`` (``"training.inner_lr"``), or ``default``."""
        value: Any = self.to_dict()
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                return default
            value = value[part]
        return value

    def to_dict(self) -> dict[str, Any]:
        """The validated config as plain data."""
        return self.config.to_dict()
