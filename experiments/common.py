"""What the reproduction scripts share: confidence intervals and writing results."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from metapeft import machine


def confidence(values: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval."""
    return float(values.mean()), float(1.96 * values.std(ddof=1) / np.sqrt(len(values)))


def write_results(
    out: Path | None, args: argparse.Namespace, rows: list[dict], table: list[str]
) -> None:
    """Prints the Markdown table; with ``out``, writes ``out.json`` (rows, arguments and
    machine) and ``out.md`` (the table)."""
    print("\n".join(table))
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine.info(), "args": vars(args) | {"out": str(out)}, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    out.with_suffix(".md").write_text("\n".join(table) + "\n")
