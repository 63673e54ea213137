"""The ``digits`` task family: N-way K-shot classification of 8x8 handwritten digits.

Data:
    scikit-learn's bundled digits (``sklearn.datasets.load_digits``: 1797 images of
    8x8 pixels, 174 to 183 per digit; no download). ``x`` is an image flattened to
    64 pixels scaled to ``[0, 1]`` (float32, so ``input_dim`` is 64) and ``y`` its
    label within the episode, ``0 .. N-1`` (int32). scikit-learn is an optional
    dependency: ``pip install "metapeft[digits]"``.

Classes:
    Every digit ``d`` turned by ``r`` in 0, 90, 180 and 270 degrees
    counterclockwise (``np.rot90``) is a candidate class named ``"d@r"``, 40 in all.
    Candidates are visited in a fixed order (the ten upright digits, then every
    digit at 90, at 180 and at 270 degrees) and one is kept unless it collides
    with a class kept before it.

    Two classes *collide* when a leave-one-out 1-nearest-neighbour classifier
    (Euclidean distance on the pixels) that sees only those two classes
    misclassifies at least 7.5% of their images: with about 180 examples each,
    they still cannot be told apart. Measured on this data, three digits are
    near-symmetric under a half turn and every other pair is well separated:

    ====================================  =====================
    pair                                  leave-one-out error
    ====================================  =====================
    ``1@0``/``1@180``, ``1@90``/``1@270``  17.0%  (collide)
    ``8@0``/``8@180``, ``8@90``/``8@270``  12.6%  (collide)
    ``0@0``/``0@180``, ``0@90``/``0@270``  11.2%  (collide)
    ``2@0``/``2@180``                      4.0%
    ``5@0``/``5@180``                      2.2%
    every other pair                       1.4% or less
    ====================================  =====================

    The threshold sits in the empty gap between 4.0% and 11.2%, so nearby
    thresholds give the same classes. A 6 turned upside down is *not* a 9 here:
    ``6@180`` and ``9@0`` are told apart 99.4% of the time, so both are kept. The
    rule drops ``0@180``, ``1@180``, ``8@180``, ``0@270``, ``1@270`` and
    ``8@270`` and keeps 34 classes: ``0@0`` to ``9@0``, ``0@90`` to ``9@90``, and
    ``2``, ``3``, ``4``, ``5``, ``6``, ``7``, ``9`` at both 180 and 270 degrees.

Splits:
    All rotations of a digit go to the same split, so a meta-test class is never
    a turned copy of a meta-train class (digits joined by a collision across
    digits would go together too; the rule above joins none). The digits are
    shuffled with a fixed seed (0, independent of the sampling seed), ordered by
    class count (largest first, stable), and each goes to the split furthest
    below its target of 60% / 20% / 20% of the classes (ties favour test, then
    val). The result:

    - ``"train"``, 20 classes: digits 2, 4, 6, 7, 9 at 0, 90, 180 and 270 degrees
    - ``"val"``, 6 classes: ``5@0``, ``8@0``, ``5@90``, ``8@90``, ``5@180``, ``5@270``
    - ``"test"``, 8 classes: ``0@0``, ``1@0``, ``3@0``, ``0@90``, ``1@90``, ``3@90``,
      ``3@180``, ``3@270``

    A config chooses its split with ``task_params={"split": "val"}`` (default
    ``"train"``); :func:`digits_classes` and :func:`digits_data` expose a split's
    classes and images (e.g. for baselines that pretrain on all meta-train classes).

Episodes:
    A task draws ``N = num_classes`` distinct classes of its split, labels them
    ``0 .. N-1`` in a random order, and draws ``K = support_size / N`` support and
    ``Q = query_size / N`` query images of each class without replacement (no
    image is in both). Support and query are each shuffled.

Example:
    >>> from metapeft.tasks import TaskConfig, TaskDistribution
    >>> config = TaskConfig("5w1s", "digits", 5, 64, support_size=5, query_size=15)
    >>> episodes = TaskDistribution(config, seed=0).sample(2)
    >>> episodes.support_x.shape, episodes.query_y.shape, episodes.query_y.dtype
    ((2, 5, 64), (2, 15), mlx.core.int32)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from metapeft.tasks._checks import check_keys

if TYPE_CHECKING:
    from metapeft.tasks.config import TaskConfig

__all__ = ["SPLITS", "digits_classes", "digits_data", "prepare", "sample", "validate"]

SPLITS = ("train", "val", "test")
ROTATIONS = (0, 90, 180, 270)
# Two classes collide when the leave-one-out 1-NN error between them reaches this.
COLLISION_ERROR = 0.075
# Seed and class fractions of the split, fixed so that splits never depend on a run.
SPLIT_SEED = 0
SPLIT_FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}
_INSTALL_HINT = 'the digits task family needs scikit-learn: pip install "metapeft[digits]"'


@dataclass(frozen=True)
class _Digits:
    names: tuple[str, ...]  # the kept classes, in visiting order
    images: tuple[np.ndarray, ...]  # per kept class: (n, 64) float32 in [0, 1]
    splits: dict[str, tuple[int, ...]]  # split -> indices into names
    candidates: tuple[str, ...]  # all 40 candidates, in visiting order
    errors: np.ndarray  # (40, 40) leave-one-out 1-NN error of each pair of candidates


def _load_images() -> tuple[np.ndarray, np.ndarray]:
    """The raw digits as ``(images (n, 8, 8) float32 in [0, 1], digits (n,))``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def _pair_errors(images: list[np.ndarray]) -> np.ndarray:
    """Leave-one-out 1-NN error of every two-class problem, as a ``(C, C)`` matrix."""
    # Pixels are multiples of 1/16, so every product and sum below is a multiple of
    # 1/256 under 2**24 / 256: exact in float32, hence identical on every machine.
    x = np.concatenate(images).astype(np.float32)
    label = np.concatenate([np.full(len(im), c) for c, im in enumerate(images)])
    counts = np.array([len(im) for im in images])
    sq = (x * x).sum(1)
    # nearest[i, c]: squared distance from image i to the nearest other image of class c.
    nearest = np.empty((len(x), len(images)), dtype=np.float32)
    for c in range(len(images)):
        own = np.flatnonzero(label == c)
        d = sq[:, None] - 2.0 * x @ x[own].T + sq[own][None, :]
        d[own, np.arange(len(own))] = np.inf
        nearest[:, c] = d.min(1)
    # wrong[a, b]: images of a whose nearest neighbour among classes {a, b} is of b.
    wrong = np.stack(
        [(nearest[label == a] < nearest[label == a, a][:, None]).sum(0) for a in range(len(images))]
    )
    return (wrong + wrong.T) / (counts[:, None] + counts[None, :])


def _keep(errors: np.ndarray) -> list[int]:
    """Indices of the candidates kept by the collision rule, visited in order."""
    kept: list[int] = []
    for c in range(len(errors)):
        if all(errors[c, k] < COLLISION_ERROR for k in kept):
            kept.append(c)
    return kept


def _split(kept: list[int], digit_of: list[int], errors: np.ndarray) -> dict[str, list[int]]:
    """Assign whole digit groups to splits (see the module docstring).

    Args:
        kept: Indices of the kept candidates.
        digit_of: The digit of every candidate.
        errors: The pairwise errors of every candidate.

    Returns:
        Split name -> positions in ``kept``.
    """
    # Digits any of whose candidates collide travel together (union-find).
    parent = {d: d for d in digit_of}

    def root(d: int) -> int:
        while parent[d] != d:
            d = parent[d]
        return d

    for a, b in zip(*np.nonzero(errors >= COLLISION_ERROR), strict=True):
        parent[root(digit_of[a])] = root(digit_of[b])
    members: dict[int, list[int]] = {}
    for i, c in enumerate(kept):
        members.setdefault(root(digit_of[c]), []).append(i)
    roots = sorted(members)
    order = [roots[i] for i in np.random.default_rng(SPLIT_SEED).permutation(len(roots))]
    order.sort(key=lambda r: -len(members[r]))
    targets = {s: f * len(kept) for s, f in SPLIT_FRACTIONS.items()}
    splits: dict[str, list[int]] = {s: [] for s in SPLITS}
    for r in order:
        # The split furthest below its target; ties favour test, then val.
        s = max(reversed(SPLITS), key=lambda s: targets[s] - len(splits[s]))
        splits[s].extend(members[r])
    return {s: sorted(v) for s, v in splits.items()}


@functools.cache
def _dataset() -> _Digits:
    """The kept classes, their images and the splits (computed once, deterministic)."""
    images, digits = _load_images()
    cand_names, cand_digits, cand_images = [], [], []
    for turns, degrees in enumerate(ROTATIONS):
        for d in range(10):
            turned = np.rot90(images[digits == d], turns, axes=(1, 2))
            cand_names.append(f"{d}@{degrees}")
            cand_digits.append(d)
            cand_images.append(np.ascontiguousarray(turned.reshape(-1, 64)))
    errors = _pair_errors(cand_images)
    kept = _keep(errors)
    split = _split(kept, cand_digits, errors)
    return _Digits(
        names=tuple(cand_names[c] for c in kept),
        images=tuple(cand_images[c] for c in kept),
        splits={s: tuple(v) for s, v in split.items()},
        candidates=tuple(cand_names),
        errors=errors,
    )


def _check_split(split: object) -> str:
    if split not in SPLITS:
        raise ValueError(f"digits split must be one of {', '.join(SPLITS)}; got {split!r}")
    return split  # type: ignore[return-value]


def digits_classes(split: str = "train") -> tuple[str, ...]:
    """The class names of one split of the digits family.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.

    Returns:
        Names ``"d@r"`` (digit ``d`` turned ``r`` degrees counterclockwise).

    Raises:
        ValueError: If ``split`` is not one of the three.
        ImportError: If scikit-learn is not installed.

    Example:
        >>> len(digits_classes("train")) + len(digits_classes("val")) + len(
        ...     digits_classes("test"))
        34
    """
    split = _check_split(split)
    data = _dataset()
    return tuple(data.names[c] for c in data.splits[split])


def digits_data(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """All images of one split, labelled by their class, e.g. to pretrain a baseline.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.

    Returns:
        ``(x, y)``: ``x`` float32 of shape ``(n, 64)`` in ``[0, 1]``, ``y`` int32 of
        shape ``(n,)`` indexing ``digits_classes(split)``. Classes come in that
        order, and images within a class in the data set's order.

    Raises:
        ValueError: If ``split`` is not one of the three.
        ImportError: If scikit-learn is not installed.

    Example:
        >>> x, y = digits_data("val")
        >>> x.shape[1], int(y.max()) + 1 == len(digits_classes("val"))
        (64, True)
    """
    split = _check_split(split)
    data = _dataset()
    chosen = data.splits[split]
    x = np.concatenate([data.images[c] for c in chosen])
    y = np.concatenate(
        [np.full(len(data.images[c]), i, dtype=np.int32) for i, c in enumerate(chosen)]
    )
    return x, y


def validate(config: TaskConfig) -> None:
    """Check a digits config without loading data: ``input_dim`` 64, a known split.

    Args:
        config: The config to check.

    Raises:
        ValueError: If ``input_dim`` is not 64, or ``task_params`` has a key other
            than ``"split"`` or an unknown split.
    """
    where = f"digits task {config.task_id!r}"
    if config.input_dim != 64:
        raise ValueError(f"{where}: input_dim must be 64 (8x8 pixels), got {config.input_dim}")
    check_keys(where, config.task_params, ("split",))
    split = config.task_params.get("split", "train")
    if split not in SPLITS:
        raise ValueError(f"{where}: task_params['split'] must be one of {SPLITS}, got {split!r}")


def prepare(config: TaskConfig) -> None:
    """Check that the data can serve a config: enough classes and images per class.

    Loads the data on first use.

    Args:
        config: A validated digits config.

    Raises:
        ValueError: If the split has fewer than ``num_classes`` classes, or a class
            has fewer images than ``(support_size + query_size) / num_classes``.
        ImportError: If scikit-learn is not installed.
    """
    where = f"digits task {config.task_id!r}"
    split = config.task_params.get("split", "train")
    data = _dataset()
    classes = data.splits[split]
    if config.num_classes > len(classes):
        raise ValueError(
            f"{where}: num_classes={config.num_classes} but split {split!r} has only "
            f"{len(classes)} classes"
        )
    k, q = config.support_size // config.num_classes, config.query_size // config.num_classes
    smallest = min(classes, key=lambda c: len(data.images[c]))
    if k + q > len(data.images[smallest]):
        raise ValueError(
            f"{where}: each class needs {k} support + {q} query = {k + q} images, but "
            f"class {data.names[smallest]!r} of split {split!r} has only "
            f"{len(data.images[smallest])}"
        )


def sample(
    config: TaskConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw one N-way K-shot task.

    Args:
        config: A validated digits config.
        rng: The generator to draw from (the distribution's).

    Returns:
        ``(support_x, support_y, query_x, query_y)``: float32 images of shapes
        ``(support_size, 64)`` and ``(query_size, 64)``, int32 labels of shapes
        ``(support_size,)`` and ``(query_size,)``.

    Raises:
        ValueError: As :func:`prepare`.

    Example:
        >>> from metapeft.tasks import TaskConfig
        >>> config = TaskConfig("t", "digits", 3, 64, support_size=6, query_size=3)
        >>> [a.shape for a in sample(config, np.random.default_rng(0))]
        [(6, 64), (6,), (3, 64), (3,)]
    """
    prepare(config)
    data = _dataset()
    classes = data.splits[config.task_params.get("split", "train")]
    n = config.num_classes
    k, q = config.support_size // n, config.query_size // n
    support_x, query_x = [], []
    for c in rng.choice(len(classes), size=n, replace=False):
        images = data.images[classes[c]]
        picked = rng.choice(len(images), size=k + q, replace=False)
        support_x.append(images[picked[:k]])
        query_x.append(images[picked[k:]])
    labels = np.arange(n, dtype=np.int32)
    order_s, order_q = rng.permutation(n * k), rng.permutation(n * q)
    return (
        np.concatenate(support_x)[order_s],
        np.repeat(labels, k)[order_s],
        np.concatenate(query_x)[order_q],
        np.repeat(labels, q)[order_q],
    )
