"""asv benchmarks of metapeft: the fused primitives and one meta-training step of each
learner, each beside its pure-MLX reference or naive twin. Problems are built by
:mod:`metapeft.bench.problems`, shared with ``metapeft bench`` and pytest-benchmark."""

from metapeft.bench.runner import prepare_process

prepare_process()  # the conditions metapeft bench and pytest-benchmark run under
