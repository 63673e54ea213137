"""MetaLearningConfig: the typed configuration of a meta-training run.

A config has five sections: ``task`` (what tasks to draw), ``model`` (the network
and its optional LoRA adapters), ``training`` (the meta-learner and its schedule),
``output`` (where a run writes) and ``tracking`` (where metrics go). Every field has
a default, so ``MetaLearningConfig()`` is a short sinusoid MAML run. An optional
sixth, ``lm``, meta-trains LoRA adapters of an mlx-lm model over text tasks instead
of ``task`` and ``model``.

A run's config is built from layers, each merged over the one before:

1. the defaults of the models below;
2. a YAML file, read by :meth:`MetaLearningConfig.from_yaml`;
3. one of the file's ``profiles:`` (partial configs, e.g. ``dev`` and ``prod``),
   deep-merged over its base;
4. environment variables ``METAPEFT_<SECTION>__<FIELD>`` (``METAPEFT_TRAINING__INNER_LR=0.02``,
   ``METAPEFT_MODEL__LORA__RANK=4``), each value read as YAML (JSON is YAML too);
5. ``overrides``, a nested dict such as the CLI builds from its flags (``None``
   values are ignored).

Mappings merge key by key; anything else (a list, a scalar) replaces what was there.
The result is validated once, by pydantic; any problem raises :class:`ConfigError`,
whose message names the file, the field, the bad value, where it came from and why.

Paths: ``output.output_dir`` is relative to the working directory (like any output
path on a command line). Paths inside a YAML file that point at inputs
(``task.tasks_file``, ``lm.model``, ``lm.tasks_file``, ``lm.base_adapters``) are relative
to that file, so a config and its task list travel
together; given in the environment or in ``overrides`` they are relative to the
working directory. The validated config holds absolute paths, and
:meth:`MetaLearningConfig.to_yaml` writes that resolved config, so a run's saved
config says exactly what it ran.

Example:
    >>> config = MetaLearningConfig.default(profile="dev")
    >>> config.training.algorithm, config.training.num_iterations
    ('maml', 200)
    >>> config.layer_sizes
    [1, 40, 40, 1]
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import typing
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from metapeft.files import atomic_write_text
from metapeft.learners.registry import get_algorithm
from metapeft.tasks import TaskConfig, get_family, load_task_configs

__all__ = [
    "DEFAULT_CONFIG",
    "ENV_PREFIX",
    "ConfigError",
    "LMSection",
    "LoRASection",
    "MetaLearningConfig",
    "ModelSection",
    "OutputSection",
    "TaskSection",
    "TrackingSection",
    "TrainingSection",
    "packaged_config",
    "packaged_configs",
]

ENV_PREFIX = "METAPEFT_"
"""Environment variables ``METAPEFT_<SECTION>__<FIELD>`` override config fields."""

DEFAULT_CONFIG = "sinusoid_maml"
"""The packaged config that :meth:`MetaLearningConfig.default` loads."""

# Fields that name input files: relative paths resolve against the YAML file that set them.
_INPUT_PATHS: tuple[tuple[str, ...], ...] = (
    ("task", "tasks_file"),
    ("lm", "model"),
    ("lm", "tasks_file"),
    ("lm", "base_adapters"),
)


class ConfigError(ValueError):
    """An invalid config: a bad value, an unknown key, a missing or malformed file.

    The message is meant for a person: it names the file (and profile), then each
    problem on its own line as ``field.path = value (from source): why``.

    Attributes:
        path: The config file, when there is one.
        problems: One line per problem (the lines of the message after its header).
    """

    def __init__(
        self, message: str, *, path: Path | None = None, problems: tuple[str, ...] = ()
    ) -> None:
        super().__init__(message)
        self.path = path
        self.problems = problems or (message,)


# ----------------------------------------------------------------------- field types

# Numbers and bools are strict: ``true`` is not 1, ``2.5`` is not 2, ``"0.1"`` is not 0.1;
# a float field takes an int. YAML's ``1e-3`` is a float thanks to the loader below.
_PosInt = Annotated[int, Field(strict=True, ge=1)]
_NonNegInt = Annotated[int, Field(strict=True, ge=0)]
_PosFloat = Annotated[float, Field(strict=True, gt=0)]
_Bool = Annotated[bool, Field(strict=True)]
_Name = Annotated[str, Field(strict=True, min_length=1)]


def _absolute(path: Path) -> Path:
    """``path`` with ``~`` expanded, made absolute against the working directory."""
    return Path(os.path.abspath(path.expanduser()))


class _Section(BaseModel):
    """Common settings: unknown keys are errors, values are frozen and finite."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False, validate_default=True
    )


_NO_VALUE = object()


def _field_error(field: str, reason: str, value: Any = _NO_VALUE) -> PydanticCustomError:
    """A validation error on ``field`` (a dotted path), raised by a cross-field check."""
    ctx = {"reason": reason, "field": field}
    if value is not _NO_VALUE:
        ctx["value"] = value
    return PydanticCustomError("metapeft_config", "{reason}", ctx)


# -------------------------------------------------------------------------- sections


class TaskSection(_Section):
    """What tasks to meta-train and evaluate on (see :class:`~metapeft.tasks.TaskConfig`).

    Attributes:
        family: A registered task family, ``"sinusoid"``, ``"digits"`` or your own.
        num_classes: N for N-way classification (>= 2), 0 or 1 for regression.
        input_dim: Features per example; the model's input size.
        support_size: Examples per task to adapt on (all classes together).
        query_size: Examples per task to score the adaptation on.
        task_params: Family options, e.g. ``{"split": "train"}`` for digits.
        tasks_file: A JSON task list (as read by :func:`~metapeft.tasks.load_task_configs`)
            to meta-train on instead of the one task above; relative to the YAML file
            that names it. Its tasks must all have this section's ``input_dim`` and
            ``num_classes``, which size the model; ``family``, the sizes and
            ``task_params`` of this section are then unused.
        eval_task_params: Merged (key by key) over each task's ``task_params`` for
            held-out evaluation, e.g. ``{"split": "test"}`` for digits.
        eval_query_size: Query examples per evaluation task; ``None`` for ``query_size``.
    """

    family: _Name = "sinusoid"
    num_classes: _NonNegInt = 0
    input_dim: _PosInt = 1
    support_size: _PosInt = 10
    query_size: _PosInt = 10
    task_params: dict[str, Any] = Field(default_factory=dict)
    tasks_file: FilePath | None = None
    eval_task_params: dict[str, Any] = Field(default_factory=dict)
    eval_query_size: _PosInt | None = None

    _train: tuple[TaskConfig, ...] = PrivateAttr(default=())
    _eval: tuple[TaskConfig, ...] = PrivateAttr(default=())

    @field_validator("tasks_file")
    @classmethod
    def _absolute_path(cls, value: Path | None) -> Path | None:
        return None if value is None else _absolute(value)

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        get_family(value)  # a ValueError that lists the known families
        return value

    @model_validator(mode="after")
    def _build_tasks(self) -> TaskSection:
        """Build (so check, family rules included) the train and evaluation TaskConfigs."""
        if self.tasks_file is None:
            try:
                train = [
                    TaskConfig(
                        task_id="train",
                        task_family=self.family,
                        num_classes=self.num_classes,
                        input_dim=self.input_dim,
                        support_size=self.support_size,
                        query_size=self.query_size,
                        task_params=self.task_params,
                    )
                ]
            except (TypeError, ValueError) as e:
                raise self._task_error(str(e)) from None
        else:
            try:
                train = load_task_configs(self.tasks_file)
            except (OSError, ValueError) as e:
                raise _field_error("task.tasks_file", str(e), str(self.tasks_file)) from None
            for config in train:
                for name in ("input_dim", "num_classes"):
                    if getattr(config, name) != getattr(self, name):
                        raise _field_error(
                            f"task.{name}",
                            f"task {config.task_id!r} of {self.tasks_file} has {name} "
                            f"{getattr(config, name)}; every task must have the {name} "
                            "of this section, which sizes the model",
                            getattr(self, name),
                        )
        try:
            held_out = [
                TaskConfig(
                    **{
                        **c.to_dict(),
                        "task_id": c.task_id if self.tasks_file else "eval",
                        "task_params": {**c.task_params, **self.eval_task_params},
                        "query_size": self.eval_query_size or c.query_size,
                    }
                )
                for c in train
            ]
        except (TypeError, ValueError) as e:
            reason = f"for evaluation (task_params merged with eval_task_params): {e}"
            raise _field_error("task.eval_task_params", reason, self.eval_task_params) from None
        self._train, self._eval = tuple(train), tuple(held_out)
        return self

    def _task_error(self, message: str) -> PydanticCustomError:
        """TaskConfig's complaint, placed on the first field that it names."""
        names = ("num_classes", "input_dim", "support_size", "query_size", "task_params")
        found = [(message.find(n), n) for n in names if n in message]
        if not found:
            return _field_error("task", message)
        name = min(found)[1]
        return _field_error(f"task.{name}", message, getattr(self, name))

    @property
    def output_dim(self) -> int:
        """The model's output size: ``num_classes`` for classification, else 1."""
        return self.num_classes if self.num_classes >= 2 else 1


class LoRASection(_Section):
    """LoRA adapters (see :func:`~metapeft.nn.apply_lora`): only they are meta-learned.

    Attributes:
        rank: Adapter rank.
        alpha: LoRA alpha; the adapter's scale is ``alpha / rank``.
        dropout: Dropout on the adapter input, in ``[0, 1)``.
        target_modules: Linear layers to adapt, by name as in mlx-lm's ``keys``
            (``"layers.0"``; in an ``lm`` section, paths inside a transformer block,
            ``"self_attn.q_proj"``); ``None`` for every Linear layer.
        num_layers: In an ``lm`` section, adapt the last ``num_layers`` transformer
            blocks; ``-1``: all of them.
    """

    rank: _PosInt = 8
    alpha: _PosFloat = 16.0
    dropout: Annotated[float, Field(strict=True, ge=0, lt=1)] = 0.0
    target_modules: Annotated[list[_Name], Field(min_length=1)] | None = None
    num_layers: Annotated[int, Field(strict=True, ge=-1)] = -1

    @field_validator("num_layers")
    @classmethod
    def _some_layers(cls, value: int) -> int:
        if value == 0:
            raise ValueError("num_layers must be >= 1, or -1 for all of them")
        return value


class LMSection(_Section):
    """Meta-train LoRA adapters of an mlx-lm model over text tasks; with this section
    the ``task`` and ``model`` sections are not used.

    Attributes:
        model: The mlx-lm model folder (relative paths: to the config file).
        tasks_file: JSONL of text tasks: ``task`` and ``text``, or ``task``,
            ``prompt`` and ``completion`` (:class:`metapeft.lm.TextTasks`).
        support_size: Examples per task in the support set.
        query_size: Examples per task in the query set.
        max_seq_length: Longer examples are cut.
        lora: The adapters, in mlx-lm's terms (``target_modules`` are its ``keys``).
        base_adapters: An mlx-lm adapter folder to start from; its rank, scale,
            dropout, keys and blocks replace ``lora``'s.
        grad_checkpoint: Recompute block activations in the backward pass (tasks
            then adapt one at a time).
        task_loop: Adapt the tasks one at a time (less memory; always so for a
            quantized model).
    """

    model: Path
    tasks_file: FilePath
    support_size: _PosInt = 4
    query_size: _PosInt = 4
    max_seq_length: _PosInt = 512
    lora: LoRASection = Field(default_factory=LoRASection)
    base_adapters: Path | None = None
    grad_checkpoint: _Bool = False
    task_loop: _Bool = False

    @field_validator("model", "tasks_file", "base_adapters")
    @classmethod
    def _absolute_path(cls, value: Path | None) -> Path | None:
        return None if value is None else _absolute(value)


class ModelSection(_Section):
    """The network: an MLP ``input_dim -> *hidden -> output_dim``.

    Attributes:
        hidden: Widths of the hidden layers.
        activation: The nonlinearity after each hidden layer.
        blas_linear: Put the model on metapeft's fast path (BLAS products and fused
            layers, :func:`~metapeft.nn.use_fast_layers`); false keeps MLX's own layers.
        lora: Adapters to meta-learn instead of every weight; ``None`` for none.
    """

    hidden: list[_PosInt] = Field(default_factory=lambda: [40, 40])
    activation: Literal["relu", "tanh", "gelu"] = "relu"
    blas_linear: _Bool = True
    lora: LoRASection | None = None


class TrainingSection(_Section):
    """The meta-learner and its schedule.

    Attributes:
        algorithm: A name in :data:`metapeft.learners.ALGORITHMS`: ``"maml"`` (second
            order), ``"fomaml"``, ``"metasgd"``, ``"reptile"``, ...
        num_iterations: Meta-steps to run.
        meta_batch_size: Tasks per meta-step.
        inner_lr: Step size of the inner SGD loop (Meta-SGD: the initial rates).
        inner_steps: Inner SGD steps per task during meta-training.
        outer_lr: Learning rate of the outer optimizer, bias-corrected Adam (as in
            the published MAML and Meta-SGD setups). Unused by Reptile.
        epsilon: Reptile's outer step size (its interpolation towards the adapted
            weights). Used by Reptile only.
        seed: Seeds the task sampling and the model's initialisation.
        checkpoint_every: Meta-steps between checkpoints.
        eval_every: Meta-steps between evaluations on held-out tasks.
        eval_tasks: Held-out tasks per evaluation.
        eval_steps: Inner SGD steps to adapt each held-out task (0: no adaptation).
        loss: ``"mse"`` for regression, ``"cross_entropy"`` for classification.
    """

    algorithm: str = "maml"
    num_iterations: _PosInt = 2000
    meta_batch_size: _PosInt = 25
    inner_lr: _PosFloat = 0.01
    inner_steps: _PosInt = 1
    outer_lr: _PosFloat = 1e-3
    epsilon: _PosFloat = 0.1
    seed: _NonNegInt = 0
    checkpoint_every: _PosInt = 500
    eval_every: _PosInt = 500
    eval_tasks: _PosInt = 100
    eval_steps: _NonNegInt = 10
    loss: Literal["mse", "cross_entropy"] = "mse"

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, value: str) -> str:
        get_algorithm(value)  # a ValueError that lists the registered algorithms
        return value


class OutputSection(_Section):
    """Where a run writes.

    Attributes:
        output_dir: The run's folder (checkpoints, metrics, its resolved config).
            A relative path is relative to the working directory when the config
            is validated (not to the config file); the validated value is absolute.
    """

    output_dir: Path = Path("runs/sinusoid-maml")

    @field_validator("output_dir")
    @classmethod
    def _absolute_path(cls, value: Path) -> Path:
        return _absolute(value)


class TrackingSection(_Section):
    """Where metrics go.

    Attributes:
        backend: ``"jsonl"`` (a local file in the output folder) or ``"mlflow"``.
        uri: The MLflow tracking URI; ``None`` for MLflow's default. Unused by jsonl.
        experiment: The experiment name runs are grouped under.
    """

    backend: Literal["jsonl", "mlflow"] = "jsonl"
    uri: _Name | None = None
    experiment: _Name = "metapeft"


# ----------------------------------------------------------------------- the config


class MetaLearningConfig(_Section):
    """The typed configuration of a meta-training run (see the module docstring).

    Build one with :meth:`from_yaml` or :meth:`default` (which apply profiles,
    environment variables and overrides, and raise :class:`ConfigError`), or
    :meth:`from_dict`. The constructor is pydantic's: it validates keyword
    arguments and raises pydantic's ``ValidationError`` (also a ``ValueError``).
    Configs are frozen: derive a changed one with ``overrides``.

    Attributes:
        task: What tasks to draw (:class:`TaskSection`).
        model: The network (:class:`ModelSection`).
        training: The meta-learner and its schedule (:class:`TrainingSection`).
        output: Where the run writes (:class:`OutputSection`).
        tracking: Where metrics go (:class:`TrackingSection`).
        lm: A language model to meta-train LoRA adapters of (:class:`LMSection`);
            None: the ``task`` and ``model`` sections describe the run.

    Example:
        >>> config = MetaLearningConfig.default(overrides={"training": {"inner_lr": 0.02}})
        >>> config.training.inner_lr, config.task.family
        (0.02, 'sinusoid')
    """

    task: TaskSection = Field(default_factory=TaskSection)
    model: ModelSection = Field(default_factory=ModelSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    output: OutputSection = Field(default_factory=OutputSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    lm: LMSection | None = None

    @model_validator(mode="after")
    def _loss_fits_task(self) -> MetaLearningConfig:
        if self.lm is not None:
            return self  # the loss is the next-token cross-entropy
        classes, loss = self.task.num_classes, self.training.loss
        if loss == "cross_entropy" and classes < 2:
            reason = f"cross_entropy needs a classification task (num_classes >= 2), got {classes}"
            raise _field_error("training.loss", reason, loss)
        if loss == "mse" and classes >= 2:
            reason = f"mse is for regression; a {classes}-way task needs cross_entropy"
            raise _field_error("training.loss", reason, loss)
        return self

    # ------------------------------------------------------------------ derived
    @property
    def layer_sizes(self) -> list[int]:
        """``[input_dim, *hidden, output_dim]``: the MLP's widths, input to output."""
        return [self.task.input_dim, *self.model.hidden, self.task.output_dim]

    def task_configs(self, *, evaluation: bool = False) -> list[TaskConfig]:
        """The tasks to meta-train on, or (``evaluation=True``) to evaluate on.

        Evaluation tasks are the training ones with ``eval_task_params`` merged over
        their ``task_params`` and ``eval_query_size`` query examples.

        Example:
            >>> config = MetaLearningConfig.from_yaml(packaged_config("digits_5way_1shot"))
            >>> config.task_configs(evaluation=True)[0].task_params
            {'split': 'test'}
        """
        return list(self.task._eval if evaluation else self.task._train)

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_yaml(
        cls,
        path: str | os.PathLike[str],
        profile: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> MetaLearningConfig:
        """Load, merge and validate a YAML config.

        Args:
            path: The YAML file: a mapping of sections (``task``, ``model``,
                ``training``, ``output``, ``tracking``), each optional, and optionally
                ``profiles``, a mapping of profile names to partial configs. An empty
                file is an empty mapping (all defaults).
            profile: The profile to merge over the file's base; ``None`` for none.
            overrides: A nested dict merged last, e.g. from CLI flags
                (``{"training": {"inner_lr": 0.02}}``); ``None`` values are ignored.
            environ: Where to read ``METAPEFT_<SECTION>__<FIELD>`` variables;
                ``None`` for ``os.environ``, ``{}`` to ignore the environment. Empty
                variables are ignored; values are YAML (``0.02``, ``[64, 64]``,
                ``'{"split": "test"}'``, ``null``; quote a string that looks like a
                number).

        Returns:
            The validated config: CLI overrides > environment > profile > file > defaults.

        Raises:
            ConfigError: If the file is missing or not valid YAML (with its line), its
                top level is not a mapping, the profile is unknown (the message lists
                the file's profiles), an environment variable is malformed (named), or
                any value is invalid: unknown keys, wrong types, out-of-range values,
                each named by its field path with its value and source.

        Example:
            >>> path = packaged_config("sinusoid_maml")
            >>> MetaLearningConfig.from_yaml(path, "prod").training.num_iterations
            20000
        """
        path = Path(path).expanduser()
        label = str(path) if profile is None else f"{path} (profile {profile!r})"
        data = _read_yaml(path)
        profiles = data.pop("profiles", None)
        if profiles is None:
            profiles = {}
        if not isinstance(profiles, Mapping):
            raise ConfigError(
                f"{path}: 'profiles' must be a mapping of profile names to partial configs, "
                f"got {type(profiles).__name__}",
                path=path,
            )
        layers = [_Layer(data, str(path), path.parent)]
        if profile is not None:
            if profile not in profiles:
                known = ", ".join(map(str, profiles)) if profiles else "none (no 'profiles:')"
                raise ConfigError(
                    f"{path}: unknown profile {profile!r}; its profiles are: {known}", path=path
                )
            partial = profiles[profile]
            if partial is None:
                partial = {}
            if not isinstance(partial, Mapping):
                raise ConfigError(
                    f"{path}: profiles.{profile} must be a mapping (a partial config), "
                    f"got {type(partial).__name__}",
                    path=path,
                )
            layers.append(_Layer(partial, f"profile {profile!r}", path.parent))
        return cls._build(layers, label, path, overrides, environ)

    @classmethod
    def default(
        cls,
        profile: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> MetaLearningConfig:
        """The packaged default config, ``sinusoid_maml.yaml`` (see :meth:`from_yaml`).

        Example:
            >>> MetaLearningConfig.default("dev").training.num_iterations
            200
        """
        return cls.from_yaml(packaged_config(DEFAULT_CONFIG), profile, overrides, environ=environ)

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        overrides: Mapping[str, Any] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> MetaLearningConfig:
        """Validate a nested dict as a config, e.g. one saved with :meth:`to_dict`.

        Relative paths in ``data`` are relative to the working directory. The
        environment is not read unless ``environ`` is given.

        Raises:
            ConfigError: As :meth:`from_yaml`.

        Example:
            >>> config = MetaLearningConfig.from_dict({"training": {"algorithm": "reptile"}})
            >>> config.training.algorithm, config.training.epsilon
            ('reptile', 0.1)
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
        layers = [_Layer(data, "the given dict", Path.cwd())]
        return cls._build(layers, "(from a dict)", None, overrides, environ if environ else {})

    @classmethod
    def _build(
        cls,
        layers: list[_Layer],
        label: str,
        path: Path | None,
        overrides: Mapping[str, Any] | None,
        environ: Mapping[str, str] | None,
    ) -> MetaLearningConfig:
        layers += _env_layers(os.environ if environ is None else environ, label, path)
        if overrides is not None:
            if not isinstance(overrides, Mapping):
                raise ConfigError(
                    f"invalid config {label}: overrides must be a nested dict, "
                    f"got {type(overrides).__name__}",
                    path=path,
                )
            layers.append(_Layer(_drop_none(overrides), "overrides", Path.cwd()))
        merged: dict[str, Any] = {}
        origins: dict[tuple[Any, ...], str] = {}
        for layer in layers:
            _merge(merged, _resolve_inputs(layer.data, layer.base_dir), origins, layer.source, ())
        try:
            return cls.model_validate(merged)
        except ValidationError as e:
            problems = tuple(_describe(err, origins, layers[0].source) for err in e.errors())
            raise _config_error(label, problems, path) from None

    # ----------------------------------------------------------------- saving
    def to_dict(self) -> dict[str, Any]:
        """Every field, resolved, as plain YAML/JSON-serialisable data (paths as strings).

        Example:
            >>> MetaLearningConfig().to_dict()["model"]["hidden"]
            [40, 40]
        """
        return self.model_dump(mode="json")

    def to_yaml(self, path: str | os.PathLike[str]) -> Path:
        """Write the resolved config to ``path`` atomically; return the path.

        The file holds every field (profiles, environment and overrides applied,
        paths absolute), so :meth:`from_yaml` reads back an equal config. It is
        written to a temporary file in the same folder, flushed to disk, then renamed
        over ``path``: ``path`` is never a partial file. Missing folders are created.

        Raises:
            OSError: If the file cannot be written (``path`` is then unchanged).

        Example:
            >>> import tempfile
            >>> folder = tempfile.mkdtemp()
            >>> saved = MetaLearningConfig().to_yaml(f"{folder}/config.yaml")
            >>> MetaLearningConfig.from_yaml(saved, environ={}) == MetaLearningConfig()
            True
        """
        path = Path(path).expanduser()
        text = (
            "# metapeft MetaLearningConfig, resolved: defaults, profile, environment and\n"
            "# overrides applied, paths absolute.\n"
        ) + yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=False)
        atomic_write_text(path, text)
        return path


# ---------------------------------------------------------------- packaged configs


def _configs_dir() -> Any:
    return resources.files("metapeft").joinpath("configs")


def packaged_configs() -> list[str]:
    """The names of the configs shipped in ``metapeft/configs/``, sorted.

    Example:
        >>> "sinusoid_maml" in packaged_configs()
        True
    """
    return sorted(
        entry.name[: -len(".yaml")]
        for entry in _configs_dir().iterdir()
        if entry.name.endswith(".yaml") and entry.is_file()
    )


def packaged_config(name: str) -> Path:
    """The path of a packaged config, by name (``"digits_5way_1shot"``, ``.yaml`` optional).

    Raises:
        ConfigError: If there is no such config (the message lists the packaged ones).

    Example:
        >>> packaged_config("lora_sinusoid").name
        'lora_sinusoid.yaml'
    """
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    known = packaged_configs()
    if stem not in known:
        raise ConfigError(f"no packaged config {name!r}; packaged configs: {', '.join(known)}")
    resource = _configs_dir().joinpath(f"{stem}.yaml")
    # A package installed as files (wheel or editable) gives a real path.
    return Path(os.fspath(resource))


# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as a float and refusing repeated keys.

    PyYAML follows YAML 1.1, whose floats need a dot (``1.0e-3``), so ``1e-3``
    would be the string ``"1e-3"``; mlx-lm adds the same resolver.
    """

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping",
                        node.start_mark,
                        f"found the key {key_node.value!r} twice",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$""",
    ),
    list("-+0123456789."),
)


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper, writing lists of scalars on one line (``hidden: [40, 40]``)."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(not isinstance(item, (list, dict)) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def _read_yaml(path: Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file, or a ConfigError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}", path=path) from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a folder, not a file: {path}", path=path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}", path=path) from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = ": ".join(s for s in (e.context, e.problem) if s)
        raise ConfigError(f"{path}: invalid YAML{where}: {what}", path=path) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}", path=path) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections (task, model, training, "
            f"output, tracking, profiles), got {type(data).__name__}",
            path=path,
        )
    return data


# ------------------------------------------------------------------------ merging


class _Layer:
    """One source of values: its data, its name in messages, where its paths start."""

    def __init__(self, data: Mapping[str, Any], source: str, base_dir: Path) -> None:
        self.data, self.source, self.base_dir = data, source, base_dir


def _env_layers(environ: Mapping[str, str], label: str, path: Path | None) -> list[_Layer]:
    """One layer per ``METAPEFT_<SECTION>__<FIELD>[__<KEY>...]`` variable, in name order.

    Variables without ``__`` after the prefix are not config fields and are skipped,
    and so are empty ones.
    """
    found: dict[tuple[str, ...], str] = {}
    layers = []
    for name in sorted(environ):
        rest = name[len(ENV_PREFIX) :] if name.startswith(ENV_PREFIX) else ""
        if "__" not in rest or environ[name] == "":
            continue
        keys = tuple(part.lower() for part in rest.split("__"))
        if not all(keys):
            raise ConfigError(
                f"invalid config {label}: environment variable {name}: expected "
                f"{ENV_PREFIX}<SECTION>__<FIELD>, "
                "names separated by exactly two underscores",
                path=path,
            )
        for other_keys, other in found.items():
            if keys[: len(other_keys)] == other_keys or other_keys[: len(keys)] == keys:
                raise ConfigError(
                    f"invalid config {label}: environment variables {other} and {name} "
                    "set the same field",
                    path=path,
                )
        found[keys] = name
        try:
            value = yaml.load(environ[name], Loader=_Loader)  # noqa: S506 (safe)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError(
                f"invalid config {label}: environment variable {name}={environ[name]!r} "
                f"is not a YAML value: {problem}",
                path=path,
            ) from None
        for key in reversed(keys):
            value = {key: value}
        layers.append(_Layer(value, f"environment variable {name}", Path.cwd()))
    return layers


def _drop_none(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` without its ``None`` values, at every depth (CLI flags not given)."""
    return {
        k: _drop_none(v) if isinstance(v, Mapping) else v for k, v in data.items() if v is not None
    }


def _resolve_inputs(data: Mapping[str, Any], base_dir: Path) -> Mapping[str, Any]:
    """``data`` with its relative input paths (``_INPUT_PATHS``) joined to ``base_dir``."""
    out = data
    for keys in _INPUT_PATHS:
        node: Any = data
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, Mapping) else None
        value = node.get(keys[-1]) if isinstance(node, Mapping) else None
        if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
            continue
        full = Path(value).expanduser()
        if full.is_absolute():
            continue
        if out is data:
            out = copy.deepcopy(dict(data))
        target = out
        for key in keys[:-1]:
            target[key] = dict(target[key])
            target = target[key]
        target[keys[-1]] = base_dir / full
    return out


def _merge(
    into: dict[str, Any],
    layer: Mapping[str, Any],
    origins: dict[tuple[Any, ...], str],
    source: str,
    prefix: tuple[Any, ...] = (),
) -> None:
    """Deep-merge ``layer`` into ``into``, noting in ``origins`` where each value came from."""
    for key, value in layer.items():
        where = (*prefix, key)
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value, origins, source, where)
            continue
        into[key] = copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)
        for old in [o for o in origins if o[: len(where)] == where]:
            del origins[old]
        origins[where] = source


# ------------------------------------------------------------------------- errors


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside a field's annotation (``LoRASection | None`` -> LoRASection)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The section model at ``loc`` (``()`` is the whole config), if any."""
    model: type[BaseModel] | None = MetaLearningConfig
    for key in loc:
        info = model.model_fields.get(key) if isinstance(key, str) else None
        model = _model_in(info.annotation) if info is not None else None
        if model is None:
            return None
    return model


def _unknown_key(loc: tuple[Any, ...]) -> str:
    model = _model_at(loc[:-1])
    if model is None:
        return "unknown key"
    known = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    where = f"fields of {_dotted(loc[:-1])}" if loc[:-1] else "sections"
    return f"unknown key{hint} ({where}: {', '.join(known)})"


def _dotted(loc: tuple[Any, ...]) -> str:
    """``("model", "hidden", 1)`` -> ``"model.hidden[1]"``."""
    text = ""
    for key in loc:
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else str(key))
    return text


def _show(value: Any) -> str:
    text = repr(str(value) if isinstance(value, Path) else value)
    return text if len(text) <= 80 else text[:77] + "..."


def _describe(err: Mapping[str, Any], origins: dict[tuple[Any, ...], str], main: str) -> str:
    """One pydantic error as ``field = value (from source): why``."""
    ctx = err.get("ctx") or {}
    if err["type"] == "metapeft_config":
        loc: tuple[Any, ...] = tuple(ctx["field"].split("."))
        value, reason = ctx.get("value", _NO_VALUE), ctx["reason"]
    else:
        loc, value, reason = tuple(err["loc"]), err.get("input", _NO_VALUE), err["msg"]
        if err["type"] == "value_error" and "error" in ctx:
            reason = str(ctx["error"])
        elif err["type"] == "extra_forbidden":
            reason = _unknown_key(loc)
    text = _dotted(loc) or "(top level)"
    if value is not _NO_VALUE and err["type"] != "missing":
        text += f" = {_show(value)}"
    sources = _sources(loc, origins)
    if not sources:
        text += " (default)"
    elif sources != [main]:
        text += f" (from {' and '.join(s for s in sources if s != main)})"
    return f"{text}: {reason}"


def _sources(loc: tuple[Any, ...], origins: dict[tuple[Any, ...], str]) -> list[str]:
    """The layers that set the value at ``loc``: the one that set it or its parent, then
    those that merged parts into it (a mapping merged from several layers)."""
    found = [origins[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in origins][:1]
    found += [s for o, s in origins.items() if len(o) > len(loc) and o[: len(loc)] == loc]
    return list(dict.fromkeys(found))


def _config_error(label: str, problems: tuple[str, ...], path: Path | None) -> ConfigError:
    head = f"invalid config {label}"
    if len(problems) == 1:
        return ConfigError(f"{head}: {problems[0]}", path=path, problems=problems)
    shown = [f"  {p}" for p in problems[:10]]
    if len(problems) > 10:
        shown.append(f"  ... and {len(problems) - 10} more")
    message = f"{head}: {len(problems)} problems\n" + "\n".join(shown)
    return ConfigError(message, path=path, problems=problems)
