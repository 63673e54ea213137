"""Task distributions for meta-learning: configs, task families and episodes.

A :class:`TaskConfig` names a task family and its sizes; a
:class:`TaskDistribution` draws meta-batches of tasks from one or more configs as
:class:`Episodes`, whose arrays carry a leading task axis ``T``. Built-in
families: ``sinusoid`` (few-shot regression, Finn et al. 2017) and ``digits``
(N-way K-shot classification of rotated 8x8 digits, needs scikit-learn);
:func:`register_family` adds your own.

Example:
    >>> from metapeft.tasks import TaskConfig, TaskDistribution
    >>> config = TaskConfig("sine", "sinusoid", num_classes=0, input_dim=1,
    ...                     support_size=10, query_size=10)
    >>> TaskDistribution(config, seed=0).sample(8).support_x.shape
    (8, 10, 1)
"""

from metapeft.tasks import digits, sinusoid
from metapeft.tasks.config import TaskConfig, load_task_configs
from metapeft.tasks.digits import digits_classes, digits_data
from metapeft.tasks.distribution import TaskDistribution
from metapeft.tasks.episodes import Episodes
from metapeft.tasks.registry import TaskFamily, get_family, known_families, register_family

register_family("sinusoid", sinusoid.sample, validate=sinusoid.validate)
register_family(
    "digits", digits.sample, classification=True, validate=digits.validate, prepare=digits.prepare
)

__all__ = [
    "Episodes",
    "TaskConfig",
    "TaskDistribution",
    "TaskFamily",
    "digits_classes",
    "digits_data",
    "get_family",
    "known_families",
    "load_task_configs",
    "register_family",
]
