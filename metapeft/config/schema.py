"""The schema of a run's config: its sections as frozen pydantic models, with every
check a value needs (types, ranges, registered names, files that must exist)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    PrivateAttr,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from metapeft.config import loading
from metapeft.config.errors import ConfigError, field_error
from metapeft.files import atomic_write_text
from metapeft.learners.registry import get_algorithm
from metapeft.nn.lora import LoRASpec
from metapeft.tasks import TaskConfig, get_family, load_task_configs

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
            held-out evaluation (``metapeft evaluate``), e.g. ``{"split": "test"}`` for
            digits.
        val_task_params: The same for the validation tasks a run evaluates on to choose
            its ``best`` checkpoint, e.g. ``{"split": "val"}``; ``None`` for
            ``eval_task_params`` (the validation tasks are then other draws).
        eval_query_size: Query examples per evaluation (and validation) task; ``None``
            for ``query_size``.
    """

    family: _Name = "sinusoid"
    num_classes: _NonNegInt = 0
    input_dim: _PosInt = 1
    support_size: _PosInt = 10
    query_size: _PosInt = 10
    task_params: dict[str, Any] = Field(default_factory=dict)
    tasks_file: FilePath | None = None
    eval_task_params: dict[str, Any] = Field(default_factory=dict)
    val_task_params: dict[str, Any] | None = None
    eval_query_size: _PosInt | None = None

    _train: tuple[TaskConfig, ...] = PrivateAttr(default=())
    _eval: tuple[TaskConfig, ...] = PrivateAttr(default=())
    _val: tuple[TaskConfig, ...] = PrivateAttr(default=())

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
                raise field_error("task.tasks_file", str(e), str(self.tasks_file)) from None
            for config in train:
                for name in ("input_dim", "num_classes"):
                    if getattr(config, name) != getattr(self, name):
                        raise field_error(
                            f"task.{name}",
                            f"task {config.task_id!r} of {self.tasks_file} has {name} "
                            f"{getattr(config, name)}; every task must have the {name} "
                            "of this section, which sizes the model",
                            getattr(self, name),
                        )
        val_params = self.eval_task_params if self.val_task_params is None else self.val_task_params
        self._train = tuple(train)
        self._eval = self._held_out(train, "eval", self.eval_task_params)
        self._val = self._held_out(train, "val", val_params)
        return self

    def _held_out(
        self, train: list[TaskConfig], name: str, params: dict[str, Any]
    ) -> tuple[TaskConfig, ...]:
        """The training tasks with ``params`` merged into theirs and the evaluation
        query size: the evaluation or the validation tasks."""
        try:
            return tuple(
                TaskConfig(
                    **{
                        **c.to_dict(),
                        "task_id": c.task_id if self.tasks_file else name,
                        "task_params": {**c.task_params, **params},
                        "query_size": self.eval_query_size or c.query_size,
                    }
                )
                for c in train
            )
        except (TypeError, ValueError) as e:
            field = f"{name}_task_params"
            use = "evaluation" if name == "eval" else "validation"
            reason = f"for {use} (task_params merged with {field}): {e}"
            raise field_error(f"task.{field}", reason, params) from None

    def _task_error(self, message: str) -> PydanticCustomError:
        """TaskConfig's complaint, placed on the first field that it names."""
        names = ("num_classes", "input_dim", "support_size", "query_size", "task_params")
        found = [(message.find(n), n) for n in names if n in message]
        if not found:
            return field_error("task", message)
        name = min(found)[1]
        return field_error(f"task.{name}", message, getattr(self, name))

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

    def spec(self) -> LoRASpec:
        """These settings as the :class:`~metapeft.nn.LoRASpec` the adapters take."""
        keys = tuple(self.target_modules) if self.target_modules else None
        return LoRASpec(self.rank, self.alpha, self.dropout, keys, self.num_layers)


class LMSection(_Section):
    """Meta-train LoRA adapters of an mlx-lm model over text tasks; with this section
    the ``task`` and ``model`` sections are not used.

    Attributes:
        model: The mlx-lm model folder (relative paths: to the config file).
        tasks_file: JSONL of text tasks: ``task`` and ``text``, or ``task``,
            ``prompt`` and ``completion`` (:class:`metapeft.lm.TextTasks`).
        val_tasks_file: JSONL of held-out tasks (their types disjoint from the
            training tasks', as :mod:`metapeft.lm.text_families` writes them) for the
            evaluations that choose ``best``; None: other draws of ``tasks_file``.
        test_tasks_file: JSONL of the tasks ``metapeft evaluate`` reports on (types
            disjoint from both); None: other draws of ``val_tasks_file``.
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
    val_tasks_file: FilePath | None = None
    test_tasks_file: FilePath | None = None
    support_size: _PosInt = 4
    query_size: _PosInt = 4
    max_seq_length: _PosInt = 512
    lora: LoRASection = Field(default_factory=LoRASection)
    base_adapters: Path | None = None
    grad_checkpoint: _Bool = False
    task_loop: _Bool = False

    @field_validator("model", "tasks_file", "val_tasks_file", "test_tasks_file", "base_adapters")
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
        rank_timeout: On several ranks (``mlx.launch``), the seconds a rank waits for
            the others (to connect, and through each meta-step and evaluation, its own
            computation included) before it stops, naming the rank it lost. Make it
            longer than the slowest meta-step. Unused by a single process.
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
    rank_timeout: _PosFloat = 30.0

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
            raise field_error("training.loss", reason, loss)
        if loss == "mse" and classes >= 2:
            reason = f"mse is for regression; a {classes}-way task needs cross_entropy"
            raise field_error("training.loss", reason, loss)
        return self

    # ------------------------------------------------------------------ derived
    @property
    def layer_sizes(self) -> list[int]:
        """``[input_dim, *hidden, output_dim]``: the MLP's widths, input to output."""
        return [self.task.input_dim, *self.model.hidden, self.task.output_dim]

    def task_configs(
        self, *, evaluation: bool = False, validation: bool = False
    ) -> list[TaskConfig]:
        """The tasks to meta-train on, to evaluate on (``evaluation=True``), or to choose
        the ``best`` checkpoint on (``validation=True``).

        Evaluation tasks are the training ones with ``eval_task_params`` merged over
        their ``task_params`` and ``eval_query_size`` query examples; validation tasks
        the same with ``val_task_params`` (by default ``eval_task_params``).

        Example:
            >>> config = MetaLearningConfig.from_yaml(packaged_config("digits_5way_1shot"))
            >>> config.task_configs(evaluation=True)[0].task_params
            {'split': 'test'}
        """
        if evaluation and validation:
            raise ValueError("ask for the evaluation or the validation tasks, not both")
        if validation:
            return list(self.task._val)
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
        layers, label = loading.yaml_layers(path, profile)
        return loading.build(cls, layers, label, path, overrides, environ)

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
        return cls.from_yaml(
            loading.packaged_config(loading.DEFAULT_CONFIG), profile, overrides, environ=environ
        )

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
        layers = [loading.Layer(data, "the given dict", Path.cwd())]
        return loading.build(
            cls, layers, "(from a dict)", None, overrides, environ if environ else {}
        )

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
        ) + loading.dump_yaml(self.to_dict())
        atomic_write_text(path, text)
        return path
