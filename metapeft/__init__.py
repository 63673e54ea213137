"""metapeft: meta-learning parameter-efficient fine-tuning on MLX.

The fused primitives are in :mod:`metapeft.ops` (pure-MLX twins in
:mod:`metapeft.reference`), LoRA layers in :mod:`metapeft.nn`, task
distributions in :mod:`metapeft.tasks` and the meta-learners in
:mod:`metapeft.learners`, timing in :mod:`metapeft.bench`; the main names are
re-exported here.
"""

import os
from typing import Any

# OpenBLAS's idle threads spin for about 0.1 s after each product by default.
# The kernels' OpenBLAS and numpy's each keep such a pool, and MLX runs its own
# threads beside them, so spinning workers take cores the others need (a product
# after one of the other library's ran 2.7x slower here). Idle workers sleep at
# once instead; waking them costs microseconds against products of milliseconds.
# Read when each OpenBLAS loads: numpy's, if imported before metapeft, keeps its own.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import mlx.core  # noqa: E402, F401  (loads libmlx before the extension)

from metapeft import distributed  # noqa: E402

# Ranks that mlx.launch starts on one host share its cores: each takes its part of the
# extension's OpenBLAS threads, which are counted when the extension loads, below.
distributed.share_cores()

from metapeft import blas, learners, nn, ops, reference  # noqa: E402
from metapeft.learners import MetaLearner  # noqa: E402
from metapeft.tasks import Episodes, TaskConfig, TaskDistribution, load_task_configs  # noqa: E402

__version__ = "0.1.0"

# Before any product: MKL's sgemm when the mkl package is installed (metapeft.blas).
blas.select()

# Loaded on first use: the config's schema needs pydantic, the runner the benchmark
# package; the numerical core runs without either.
_LAZY = {
    "ConfigError": "metapeft.config",
    "MetaLearningConfig": "metapeft.config",
    "BenchmarkRunner": "metapeft.bench",
}

__all__ = [
    *_LAZY,
    *(cls.__name__ for cls in learners.ALGORITHMS.values()),
    "Episodes",
    "MetaLearner",
    "TaskConfig",
    "TaskDistribution",
    "__version__",
    "learners",
    "load_task_configs",
    "nn",
    "ops",
    "reference",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    try:
        return getattr(learners, name)  # the algorithms, by class name
    except AttributeError:
        raise AttributeError(f"module 'metapeft' has no attribute {name!r}") from None
