"""A model registry: named, versioned checkpoints with metadata and tags.

Two stores with one interface: :class:`LocalRegistry`, a JSON index file (the
default), and :class:`MlflowRegistry`, MLflow's model registry (when the config's
``tracking.backend`` is ``mlflow``). Registering a checkpoint checks that it loads
(checksum included) and records its name, version (1, 2, ... per name), absolute
path, metadata (the checkpoint's algorithm, step and metapeft version, plus what
you add) and tags.

Example:
    >>> registry = LocalRegistry("runs/registry.json")  # doctest: +SKIP
    >>> registry.register("sine", "runs/x/checkpoints/best.safetensors", tags={"stage": "dev"})
    ... # doctest: +SKIP
    ModelVersion(name='sine', version=1, ...)
    >>> trees, metadata = registry.load("sine")  # doctest: +SKIP
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from metapeft.files import atomic_write_text
from metapeft.tracking import mlflow_client, mlflow_errors

INDEX_FORMAT = "metapeft-registry-1"
DEFAULT_INDEX = Path("runs/registry.json")
_METADATA_TAG = "metapeft.metadata"


@dataclass(frozen=True)
class ModelVersion:
    """One registered checkpoint.

    Attributes:
        name: The model's name.
        version: 1 for the first checkpoint registered under ``name``, then 2, ...
        path: The checkpoint file, absolute.
        metadata: The checkpoint's algorithm, step and metapeft version, and more.
        tags: Free-form ``str -> str`` labels.
        created: When it was registered, ISO 8601 (UTC).
    """

    name: str
    version: int
    path: str
    metadata: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The record as plain JSON-serialisable data."""
        return asdict(self)


class Registry(ABC):
    """What both stores offer; :meth:`register` and :meth:`load` are shared."""

    def register(
        self,
        name: str,
        path: str | os.PathLike[str],
        metadata: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> ModelVersion:
        """Adds the checkpoint at ``path`` as the next version of ``name``.

        Raises:
            FileNotFoundError: If there is no checkpoint at ``path``.
            ValueError: If the name is empty, or the checkpoint does not load (the
                message names the file).
        """
        if not name or not name.strip():
            raise ValueError("a model name must not be empty")
        path = Path(path).expanduser().resolve()
        full = {**checkpoint_metadata(path), **(metadata or {})}
        return self._add(name, str(path), full, {str(k): str(v) for k, v in (tags or {}).items()})

    def load(self, name: str, version: int | None = None) -> tuple[dict[str, Any], dict]:
        """The trees and metadata of a registered checkpoint (the latest version by default).

        Raises:
            KeyError: If there is no such model or version.
            ValueError: If the checkpoint no longer loads (named).
        """
        from metapeft import checkpoint

        return checkpoint.load(self.get(name, version).path)

    def get(self, name: str, version: int | None = None) -> ModelVersion:
        """The record of ``name`` at ``version`` (the latest when ``None``).

        Raises:
            KeyError: If there is no such model or version (the message lists what exists).
        """
        versions = [v for v in self.list() if v.name == name]
        if not versions:
            known = sorted({v.name for v in self.list()})
            raise KeyError(
                f"no model {name!r} in {self.where}; registered: {', '.join(known) or 'none'}"
            )
        if version is None:
            return max(versions, key=lambda v: v.version)
        for found in versions:
            if found.version == version:
                return found
        have = ", ".join(str(v.version) for v in sorted(versions, key=lambda v: v.version))
        raise KeyError(f"model {name!r} has no version {version} in {self.where}; versions: {have}")

    @abstractmethod
    def list(self) -> list[ModelVersion]:
        """Every registered version, by name then version."""

    @property
    @abstractmethod
    def where(self) -> str:
        """The store, for messages."""

    @abstractmethod
    def _add(self, name: str, path: str, metadata: dict, tags: dict) -> ModelVersion:
        """Stores a new version of ``name``."""


class LocalRegistry(Registry):
    """A registry in one JSON file, rewritten atomically under a lock on each change.

    Args:
        index: The JSON index file; created on the first registration.
    """

    def __init__(self, index: str | os.PathLike[str] = DEFAULT_INDEX) -> None:
        self.index = Path(index).expanduser().absolute()

    @property
    def where(self) -> str:
        return str(self.index)

    def list(self) -> list[ModelVersion]:
        data = self._read()
        return [
            ModelVersion(**record)
            for name in sorted(data["models"])
            for record in data["models"][name]
        ]

    def _add(self, name: str, path: str, metadata: dict, tags: dict) -> ModelVersion:
        with self._locked():
            data = self._read()
            versions = data["models"].setdefault(name, [])
            record = ModelVersion(
                name=name,
                version=max((v["version"] for v in versions), default=0) + 1,
                path=path,
                metadata=metadata,
                tags=tags,
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            )
            versions.append(record.to_dict())
            atomic_write_text(self.index, json.dumps(data, indent=2, sort_keys=True) + "\n")
        return record

    def _read(self) -> dict[str, Any]:
        if not self.index.exists():
            return {"format": INDEX_FORMAT, "models": {}}
        try:
            data = json.loads(self.index.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.index}: not a readable registry index ({e})") from None
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
            raise ValueError(f"{self.index}: not a metapeft registry index")
        return data

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.index.parent.mkdir(parents=True, exist_ok=True)
        with open(self.index.with_name(self.index.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield


class MlflowRegistry(Registry):
    """MLflow's model registry at ``uri``: a registered model per name, a model version per
    checkpoint (its ``source`` is the checkpoint path, the metadata a JSON tag).

    Raises:
        TrackingError: If MLflow is not installed or refuses the URI.
    """

    def __init__(self, uri: str | None) -> None:
        self.uri = uri
        self.client = mlflow_client(uri)

    @property
    def where(self) -> str:
        return f"MLflow registry {self.uri or '(default)'}"

    def list(self) -> list[ModelVersion]:
        with mlflow_errors(self.uri):
            found = [self._record(v) for v in self.client.search_model_versions()]
        return sorted(found, key=lambda v: (v.name, v.version))

    def _add(self, name: str, path: str, metadata: dict, tags: dict) -> ModelVersion:
        from mlflow.exceptions import MlflowException

        with mlflow_errors(self.uri):
            try:
                self.client.get_registered_model(name)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                self.client.create_registered_model(name)
            version = self.client.create_model_version(
                name, source=path, tags={**tags, _METADATA_TAG: json.dumps(metadata)}
            )
        return self._record(version)

    @staticmethod
    def _record(version: Any) -> ModelVersion:
        tags = dict(version.tags)
        metadata = json.loads(tags.pop(_METADATA_TAG, "{}"))
        created = time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(version.creation_timestamp / 1000)
        )
        return ModelVersion(
            name=version.name,
            version=int(version.version),
            path=version.source,
            metadata=metadata,
            tags=tags,
            created=created,
        )


def open_registry(
    tracking: Any, index: str | os.PathLike[str] = DEFAULT_INDEX
) -> LocalRegistry | MlflowRegistry:
    """MLflow's registry when ``tracking.backend`` is ``mlflow``, else the local ``index``.

    Example:
        >>> open_registry(MetaLearningConfig().tracking).where  # doctest: +SKIP
        '/home/me/runs/registry.json'
    """
    if tracking.backend == "mlflow":
        return MlflowRegistry(tracking.uri)
    return LocalRegistry(index)


def checkpoint_metadata(path: Path) -> dict[str, Any]:
    """What a checkpoint says about itself: algorithm, step, metapeft version.

    Raises:
        FileNotFoundError, ValueError: As :func:`metapeft.checkpoint.load`.
    """
    import metapeft
    from metapeft import checkpoint

    _, metadata = checkpoint.load(path)
    return {
        "algorithm": metadata.get("algorithm"),
        "step": metadata.get("step"),
        "metapeft_version": metapeft.__version__,
    }
