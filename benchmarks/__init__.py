"""Benchmarks: pytest-benchmark groups comparing fused paths with stock MLX."""
