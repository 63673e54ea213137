"""PNG plots with matplotlib: a run's loss curves, and the helpers every plot in
metapeft uses. Figures are drawn off-screen without pyplot, so plotting never
changes the caller's matplotlib backend."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from metapeft.files import atomic_write
from metapeft.tracking import read_metrics

CURVES = (
    ("support_loss", "support loss (before adaptation)"),
    ("query_loss", "query loss (after adaptation)"),
)


def new_figure(width: float, height: float) -> tuple[Any, Any]:
    """A ``(figure, axes)`` pair of ``width`` x ``height`` inches, laid out to fit."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.add_subplot()


def save_png(figure: Any, path: str | os.PathLike[str]) -> Path:
    """Writes ``figure`` to ``path`` as a PNG, atomically; returns the path."""
    path = Path(path)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    return path


def plot_losses(
    run_dir: str | os.PathLike[str], output: str | os.PathLike[str] | None = None
) -> Path:
    """Plots a run's support and query losses per meta-step, and its validation query loss.

    Args:
        run_dir: A run folder with ``metrics.jsonl``.
        output: The PNG to write (atomically); default ``RUN_DIR/loss.png``.

    Returns:
        The PNG's path.

    Raises:
        FileNotFoundError: If the run has no metrics file.
        ValueError: If the metrics file is unreadable or holds no steps.

    Example:
        >>> plot_losses("runs/sinusoid-maml-dev")  # doctest: +SKIP
        PosixPath('runs/sinusoid-maml-dev/loss.png')
    """
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{Path(run_dir) / 'metrics.jsonl'}: no meta-steps logged yet")
    output = Path(run_dir) / "loss.png" if output is None else Path(output)
    figure, axes = new_figure(7, 4)
    for key, label in CURVES:
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            axes.plot(*zip(*points, strict=True), label=label, linewidth=1)
    validation = [(r["step"], r["val_query_loss"]) for r in rows if "val_query_loss" in r]
    if validation:
        axes.plot(*zip(*validation, strict=True), "o-", label="validation query loss")
    axes.set_xlabel("meta-step")
    axes.set_ylabel("loss")
    if all(v > 0 for r in rows for k, v in r.items() if k.endswith("loss")):
        axes.set_yscale("log")
    axes.set_title(Path(run_dir).resolve().name)
    axes.grid(alpha=0.3)
    axes.legend()
    return save_png(figure, output)
