"""Experiment tracking: where a run's params, metrics and artifacts go.

Every run writes its per-step metrics to ``metrics.jsonl`` in its run folder
(:class:`JsonlTracker`; ``metapeft plot`` and ``--resume`` read it). With
``tracking.backend: mlflow`` in the config, the run is also recorded in MLflow
(:class:`MlflowTracker`): the resolved config as params, every step's metrics, and
the config, checkpoints and log file as artifacts. MLflow is optional
(``pip install "metapeft[tracking]"``); asking for it without it installed is a
:class:`TrackingError`.

Example:
    >>> tracker = open_tracker(config, run_dir)  # doctest: +SKIP
    >>> tracker.start(config, resume=False, step=0)  # doctest: +SKIP
    >>> tracker.log_metrics(1, {"query_loss": 0.5})  # doctest: +SKIP
    >>> tracker.finish("FINISHED")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from metapeft.files import atomic_write_text

Status = Literal["FINISHED", "KILLED", "FAILED"]

METRICS_FILE = "metrics.jsonl"
MLFLOW_RUN_FILE = "mlflow_run.json"


class TrackingError(RuntimeError):
    """The tracking backend cannot be used (not installed, unreachable store)."""


class Tracker:
    """What a training run reports to; the base records nothing.

    A run calls :meth:`start` once, :meth:`log_metrics` after every meta-step,
    :meth:`log_artifact` for files worth keeping, then :meth:`finish`.
    """

    def start(self, config: Any, *, resume: bool, step: int) -> None:
        """Begins (or, with ``resume``, continues after ``step``) recording a run."""

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Records one meta-step's metrics."""

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        """Keeps a copy of the file ``path`` (under ``folder``) with the run."""

    def finish(self, status: Status) -> None:
        """Ends the run with ``status``."""


class JsonlTracker(Tracker):
    """Metrics as JSON lines, ``{"step": N, ...}``, in ``RUN_DIR/metrics.jsonl``.

    Artifacts already live in the run folder, so :meth:`log_artifact` keeps nothing.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self._file: Any = None

    def start(self, config: Any, *, resume: bool, step: int) -> None:
        if resume:
            _truncate(self.path, step)
        else:
            self.path.unlink(missing_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()

    def finish(self, status: Status) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class MlflowTracker(Tracker):
    """A run in MLflow: params, per-step metrics, artifacts.

    The MLflow run id is kept in ``RUN_DIR/mlflow_run.json`` so that a resumed
    training run continues the same MLflow run.

    Args:
        run_dir: The training run's folder.
        uri: The tracking URI (``sqlite:///path/mlflow.db``, ``file:/path``, a server);
            ``None`` for MLflow's default. The model registry uses the same URI.
        experiment: The MLflow experiment name; created when missing.
    """

    def __init__(self, run_dir: str | os.PathLike[str], uri: str | None, experiment: str) -> None:
        self.run_dir = Path(run_dir)
        self.uri = uri
        self.experiment = experiment
        self.client: Any = None
        self.run_id: str | None = None

    def start(self, config: Any, *, resume: bool, step: int) -> None:
        self.client = mlflow_client(self.uri)
        record = self.run_dir / MLFLOW_RUN_FILE
        with mlflow_errors(self.uri):
            if resume and record.is_file():
                self.run_id = json.loads(record.read_text())["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                self.client.set_tag(self.run_id, "metapeft.resumed_at_step", str(step))
                return
            found = self.client.get_experiment_by_name(self.experiment)
            experiment_id = (
                found.experiment_id
                if found is not None
                else self.client.create_experiment(
                    self.experiment, artifact_location=artifact_location(self.uri)
                )
            )
            run = self.client.create_run(
                experiment_id,
                run_name=self.run_dir.name,
                tags={"metapeft.run_dir": str(self.run_dir)},
            )
            self.run_id = run.info.run_id
            self._log_params(config.to_dict())
        atomic_write_text(record, json.dumps({"run_id": self.run_id, "uri": self.uri}) + "\n")

    def _log_params(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [
            Param(key, value if isinstance(value, str) else json.dumps(value))
            for key, value in _flatten(config).items()
        ]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        with mlflow_errors(self.uri):
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if self.run_id is None:  # the run failed before it started: nothing to attach to
            return
        with mlflow_errors(self.uri):
            self.client.log_artifact(self.run_id, str(path), folder)

    def finish(self, status: Status) -> None:
        if self.run_id is None:
            return
        with mlflow_errors(self.uri):
            self.client.set_terminated(self.run_id, status)


class Trackers(Tracker):
    """Several trackers as one, called in order."""

    def __init__(self, *trackers: Tracker) -> None:
        self.trackers = trackers

    def start(self, config: Any, *, resume: bool, step: int) -> None:
        for tracker in self.trackers:
            tracker.start(config, resume=resume, step=step)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for tracker in self.trackers:
            tracker.log_metrics(step, metrics)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        for tracker in self.trackers:
            tracker.log_artifact(path, folder)

    def finish(self, status: Status) -> None:
        for tracker in self.trackers:
            tracker.finish(status)


def open_tracker(config: Any, run_dir: str | os.PathLike[str]) -> Tracker:
    """The tracker ``config.tracking`` asks for: JSONL always, plus MLflow if configured.

    Raises:
        TrackingError: If the backend is ``mlflow`` and MLflow is not installed.

    Example:
        >>> tracker = open_tracker(MetaLearningConfig(), "runs/x")  # doctest: +SKIP
    """
    jsonl = JsonlTracker(run_dir)
    tracking = config.tracking
    if tracking.backend == "mlflow":
        require_mlflow()
        return Trackers(jsonl, MlflowTracker(run_dir, tracking.uri, tracking.experiment))
    return jsonl


def artifact_location(uri: str | None) -> str | None:
    """Where a new experiment keeps its artifacts: beside a sqlite database (MLflow's
    default for a database store is ``./mlruns`` in the working directory); ``None``
    (MLflow's choice) for any other store.

    Example:
        >>> artifact_location("sqlite:////data/mlflow.db")
        'file:///data/mlartifacts'
    """
    if uri is None or not uri.startswith("sqlite:///"):
        return None
    database = Path(uri[len("sqlite:///") :])
    return (database.parent.resolve() / "mlartifacts").as_uri()


def require_mlflow() -> None:
    """Raises :class:`TrackingError` unless MLflow can be imported."""
    try:
        import mlflow  # noqa: F401
    except ImportError as e:
        raise TrackingError(
            f"tracking.backend is 'mlflow' but MLflow is not installed ({e}); "
            'install it with: pip install "metapeft[tracking]"'
        ) from None


def mlflow_client(uri: str | None) -> Any:
    """An ``MlflowClient`` on ``uri`` for tracking and the registry.

    Raises:
        TrackingError: If MLflow is missing or refuses the URI.
    """
    require_mlflow()
    from mlflow import MlflowClient

    with mlflow_errors(uri):
        return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextmanager
def mlflow_errors(uri: str | None) -> Iterator[None]:
    """Turns MLflow's exceptions inside the block into a one-line :class:`TrackingError`
    naming the URI."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        first = str(e.message).strip().splitlines()[0]
        raise TrackingError(f"MLflow store {uri or '(default)'}: {first}") from e


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, float]]:
    """The metrics a run logged, one dict per meta-step, in order.

    Raises:
        FileNotFoundError: If the run folder has no metrics file.
        ValueError: If a line is not JSON (naming the file and line).
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics file (is {run_dir} a metapeft run folder?)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {number} is not JSON ({e})") from None
    return rows


def _truncate(path: Path, step: int) -> None:
    """Drops logged steps after ``step`` (those a resumed run redoes).

    A last line cut short (the process died while writing it) is dropped with a
    warning; a bad line anywhere else is a ``ValueError`` naming the file and line.
    """
    if not path.exists():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                logging.getLogger("metapeft").warning(
                    "%s: dropped an incomplete last line (%s)", path, e
                )
                break
            raise ValueError(f"{path}: line {number} is not JSON ({e})") from None
        if row["step"] <= step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out
