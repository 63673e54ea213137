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

from metapeft.config.errors import ConfigError
from metapeft.config.loading import (
    DEFAULT_CONFIG,
    ENV_PREFIX,
    packaged_config,
    packaged_configs,
)
from metapeft.config.schema import (
    LMSection,
    LoRASection,
    MetaLearningConfig,
    ModelSection,
    OutputSection,
    TaskSection,
    TrackingSection,
    TrainingSection,
)

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
