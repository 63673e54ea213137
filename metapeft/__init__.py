"""metapeft: meta-learning parameter-efficient fine-tuning on MLX.

The fused primitives are in :mod:`metapeft.ops` (pure-MLX twins in
:mod:`metapeft.reference`), LoRA layers in :mod:`metapeft.nn`, task
distributions in :mod:`metapeft.tasks` and the meta-learners in
:mod:`metapeft.learners`, timing in :mod:`metapeft.bench`; the main names are
re-exported here.
"""

import mlx.core  # noqa: F401  (loads libmlx before the extension)

from metapeft import nn, ops, reference
from metapeft.config import ConfigError, MetaLearningConfig
from metapeft.learners import FOMAML, MAML, MetaLearner, MetaSGD, Reptile
from metapeft.tasks import Episodes, TaskConfig, TaskDistribution, load_task_configs

__version__ = "0.1.0"

from metapeft.bench import BenchmarkRunner  # noqa: E402

__all__ = [
    "BenchmarkRunner",
    "ConfigError",
    "MetaLearningConfig",
    "FOMAML",
    "MAML",
    "Episodes",
    "MetaLearner",
    "MetaSGD",
    "Reptile",
    "TaskConfig",
    "TaskDistribution",
    "__version__",
    "load_task_configs",
    "nn",
    "ops",
    "reference",
]
