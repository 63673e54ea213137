"""asv benchmarks of metapeft: the fused primitives and one meta-training step of each
learner, each beside its pure-MLX reference or naive twin. Problems are built by
:mod:`metapeft.bench.problems`, shared with ``metapeft bench`` and pytest-benchmark."""
