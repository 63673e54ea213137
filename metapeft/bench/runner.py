"""BenchmarkRunner: the one timing mechanism of metapeft.

Every timed block records its wall time (after the MLX streams are synchronized),
MLX's peak memory during the block, and the machine it ran on. The bench command,
the benchmark suites and the training loop's meta-steps/s all go through it.
"""

from __future__ import annotations

import ctypes
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlx.core as mx

from metapeft import machine
from metapeft.files import atomic_write_text


@dataclass
class Operation:
    """The samples of one labelled operation with one set of parameters."""

    label: str
    params: dict[str, Any]
    seconds: list[float] = field(default_factory=list)
    peak_memory_bytes: int = 0

    @property
    def median(self) -> float:
        """Median wall time in seconds."""
        return statistics.median(self.seconds)

    def to_dict(self) -> dict[str, Any]:
        s = self.seconds
        return {
            "label": self.label,
            "params": self.params,
            "samples": len(s),
            "median_s": self.median,
            "mean_s": statistics.fmean(s),
            "min_s": min(s),
            "max_s": max(s),
            "stdev_s": statistics.stdev(s) if len(s) > 1 else 0.0,
            "peak_memory_bytes": self.peak_memory_bytes,
            "seconds": s,
        }


def hold_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of returning it to the system.

    By default glibc gives large freed blocks straight back, so numpy's and torch's
    multi-megabyte temporaries are faulted in afresh on every call: about 6,000 page
    faults, a third of the time, in numpy's ``lora_linear`` forward and backward
    here. MLX keeps a buffer cache of its own. Returns whether it took effect (not
    without glibc, e.g. on macOS).
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    # M_MMAP_THRESHOLD (-3): blocks up to 32 MiB, glibc's largest, come from the heap;
    # M_TRIM_THRESHOLD (-1): the heap's free top is never given back.
    return bool(mallopt(-3, 32 << 20)) and bool(mallopt(-1, 2**31 - 1))


def prepare_process() -> dict[str, str]:
    """Put this process in the conditions every benchmark runs under; return them, to
    be recorded with the results. Call it before timing anything (and before torch
    is imported)."""
    from metapeft.bench import peers

    # Idle OpenMP threads of torch sleep after 10,000 spins rather than libgomp's default
    # 300,000, as metapeft has idle OpenBLAS threads sleep: timed in turns, torch's
    # spinning threads had slowed the next implementation by up to 1.7x.
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    installed = peers.installed()
    return {
        "malloc": "freed memory kept" if hold_freed_memory() else "system default",
        "OPENBLAS_THREAD_TIMEOUT": os.environ.get("OPENBLAS_THREAD_TIMEOUT", "unset"),
        "GOMP_SPINCOUNT": os.environ["GOMP_SPINCOUNT"],
        "peers": ", ".join(f"{k} {v}" for k, v in installed.items()) or "none installed",
    }


class BenchmarkRunner:
    """Times labelled operations and keeps their wall time and peak memory.

    Evaluate what you time inside the block (``mx.eval``, or call something that
    does): on exit the runner waits for every queued MLX computation, then reads the
    clock and MLX's peak memory. Blocks with the same label and parameters add
    samples to one operation.

    Example:
        >>> runner = BenchmarkRunner("demo")
        >>> for _ in range(3):
        ...     with runner.time_operation("add", n=4):
        ...         mx.eval(mx.ones(4) + 1)
        >>> runner.operations[0].label, len(runner.operations[0].seconds)
        ('add', 3)
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.machine = machine.info()
        self.started = datetime.now(UTC).isoformat(timespec="seconds")
        self.conditions: dict[str, str] = {}  # see prepare_process()
        self._operations: dict[tuple[str, str], Operation] = {}

    @property
    def operations(self) -> list[Operation]:
        """Recorded operations, in the order they were first timed."""
        return list(self._operations.values())

    def operation(self, label: str, **params: Any) -> Operation | None:
        """The operation recorded under ``label`` and ``params``, if any."""
        return self._operations.get(_key(label, params))

    @contextmanager
    def time_operation(self, label: str, **params: Any) -> Iterator[Operation]:
        """Time the block as one sample of ``label`` (with optional parameters)."""
        key = _key(label, params)
        op = self._operations.get(key) or Operation(label, dict(params))
        mx.synchronize()
        mx.reset_peak_memory()
        start = time.perf_counter()
        yield op
        mx.synchronize()
        op.seconds.append(time.perf_counter() - start)
        op.peak_memory_bytes = max(op.peak_memory_bytes, mx.get_peak_memory())
        self._operations[key] = op

    def measure(
        self,
        label: str,
        fn: Callable[[], Any],
        *,
        repeat: int = 10,
        warmup: int = 1,
        min_time: float = 0.0,
        number: int = 1,
        **params: Any,
    ) -> Operation:
        """Time ``fn`` (its result evaluated) as ``label``: ``warmup`` untimed calls,
        then at least ``repeat`` samples, and more until ``min_time`` seconds have been
        spent. A sample is the mean of ``number`` back-to-back calls, which keeps the
        runner's own synchronisation out of the time of a microsecond-scale ``fn``."""
        _check_counts(repeat, number)
        for _ in range(warmup):
            mx.eval(fn())
        spent, n = 0.0, 0
        while n < repeat or spent < min_time:
            op = self._sample(label, fn, number, params)
            spent += op.seconds[-1] * number
            n += 1
        return op

    def measure_interleaved(
        self,
        label: str,
        fns: Mapping[str, Callable[[], Any]],
        *,
        key: str = "impl",
        repeat: int = 10,
        warmup: int = 1,
        number: int = 1,
        **params: Any,
    ) -> list[Operation]:
        """Time several implementations of ``label`` in turns, one sample of each per
        round, each recorded under ``key=<its name>``. A machine that slows down or
        speeds up during the run then weighs on all of them alike, which keeps their
        ratios fair. Samples are as in :meth:`measure`."""
        _check_counts(repeat, number)
        for fn in fns.values():
            for _ in range(warmup):
                mx.eval(fn())
        ops: dict[str, Operation] = {}
        for _ in range(repeat):
            for name, fn in fns.items():
                ops[name] = self._sample(label, fn, number, {**params, key: name})
        return list(ops.values())

    def _sample(
        self, label: str, fn: Callable[[], Any], number: int, params: dict[str, Any]
    ) -> Operation:
        with self.time_operation(label, **params) as op:
            for _ in range(number):
                mx.eval(fn())
        op.seconds[-1] /= number
        return op

    def summary(self) -> str:
        """A plain-text table: label, parameters, samples, median, min, peak memory."""
        rows = [("operation", "parameters", "n", "median", "min", "peak memory")]
        for op in self.operations:
            rows.append(
                (
                    op.label,
                    ", ".join(f"{k}={v}" for k, v in op.params.items()),
                    str(len(op.seconds)),
                    format_seconds(op.median),
                    format_seconds(min(op.seconds)),
                    format_bytes(op.peak_memory_bytes),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(line.rstrip() for line in lines)

    def to_dict(self) -> dict[str, Any]:
        """Everything recorded, with the machine stamp, as plain JSON types."""
        return {
            "name": self.name,
            "started": self.started,
            "machine": self.machine,
            "conditions": self.conditions,
            "operations": [op.to_dict() for op in self.operations],
        }

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON (atomically) and return the path."""
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    def plot(self, path: str | Path) -> Path:
        """A PNG bar chart of every operation's median time (min to max as error bars)."""
        from metapeft.plotting import new_figure, save_png

        ops = self.operations
        if not ops:
            raise ValueError("nothing to plot: no operation has been timed")
        names = [op.label + "".join(f"\n{k}={v}" for k, v in op.params.items()) for op in ops]
        medians = [op.median * 1e3 for op in ops]
        low = [m - min(op.seconds) * 1e3 for m, op in zip(medians, ops, strict=True)]
        high = [max(op.seconds) * 1e3 - m for m, op in zip(medians, ops, strict=True)]
        fig, ax = new_figure(max(4.0, 1.2 * len(ops)), 4.0)
        ax.bar(range(len(ops)), medians, yerr=[low, high], capsize=3, color="tab:blue")
        ax.set_xticks(range(len(ops)), names, fontsize=7)
        ax.set_ylabel("median wall time (ms)")
        ax.set_title(f"{self.name} on {self.machine['chip']}", fontsize=9)
        return save_png(fig, path)


def peak_memory(fn: Callable[[], Any]) -> int:
    """MLX's peak memory, in bytes, over one call of ``fn``, which evaluates its work."""
    with BenchmarkRunner("peak memory").time_operation("call") as op:
        fn()
    return op.peak_memory_bytes


def _key(label: str, params: dict[str, Any]) -> tuple[str, str]:
    return label, json.dumps(params, sort_keys=True, default=str)


def _check_counts(repeat: int, number: int) -> None:
    if repeat < 1 or number < 1:
        raise ValueError(f"repeat and number must be at least 1, got {repeat} and {number}")


def format_seconds(seconds: float) -> str:
    """``1.23 s``, ``4.56 ms`` or ``7.8 us``."""
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def format_bytes(n: int) -> str:
    """``12.3 MiB`` or ``1.20 GiB`` (``-`` for zero)."""
    if not n:
        return "-"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"
