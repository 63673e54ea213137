"""Loss curves of a run as a PNG (matplotlib)."""

from __future__ import annotations

import os
from pathlib import Path

from metapeft.files import atomic_write
from metapeft.tracking import read_metrics

CURVES = (
    ("support_loss", "support loss (before adaptation)"),
    ("query_loss", "query loss (after adaptation)"),
)


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
    from matplotlib.figure import Figure

    output = Path(run_dir) / "loss.png" if output is None else Path(output)
    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.add_subplot()
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
    atomic_write(output, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    return output
