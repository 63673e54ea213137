"""Benchmarks: :class:`BenchmarkRunner` (the one timing mechanism), the shared
problems, the standard suite of ``metapeft bench`` and its reports."""

from metapeft.bench.runner import BenchmarkRunner, Operation

__all__ = ["BenchmarkRunner", "Operation"]
