"""asv: one meta-training step of each learner, fused against stock MLX.

``fused`` is metapeft's batched learner on its own layers, ``naive`` a Python loop
over tasks on stock layers, ``mlx`` MAML written as plain MLX ``vmap`` + ``compile``.
Besides the time of a step, each records MLX's peak memory and meta-steps/s.
"""

from metapeft.bench import problems
from metapeft.bench import runner as bench_runner
from metapeft.bench.problems import size

ALGORITHMS = list(problems.ALGORITHMS)


class _MetaStep:
    problem = ""
    sizes: dict = {}

    def setup(self, algorithm, inner_steps, impl):
        if impl == "mlx" and algorithm != "maml":
            raise NotImplementedError("the plain-MLX baseline exists for MAML only")
        self.step = problems.meta_step(
            self.problem, algorithm, impl, inner_steps=inner_steps, **self.sizes
        )
        self.step()  # compile and warm up outside the timings

    def time_meta_step(self, *_):
        self.step()

    def track_peak_memory(self, *_):
        return bench_runner.peak_memory(self.step)

    track_peak_memory.unit = "bytes"

    def track_meta_steps_per_second(self, *_):
        runner = bench_runner.BenchmarkRunner("throughput")
        op = runner.measure("meta_step", self.step, repeat=3, warmup=0)
        return 1.0 / op.median

    track_meta_steps_per_second.unit = "meta-steps/s"


class SinusoidMetaStep(_MetaStep):
    """Sinusoid regression (1-40-40-1 MLP), 25 tasks of 10 shots."""

    problem = "sinusoid"
    sizes = {"tasks": size(25, 2)}
    params = (ALGORITHMS, [1, 5], ["fused", "mlx", "naive"])
    param_names = ["algorithm", "inner_steps", "impl"]


class LoRAMetaStep(_MetaStep):
    """Two 512x512 LoRA layers (r=8), 8 tasks of 32 rows."""

    problem = "lora"
    sizes = size(
        {"tasks": 8, "rows": 32, "dim": 512, "rank": 8, "layers": 2},
        {"tasks": 2, "rows": 4, "dim": 16, "rank": 2, "layers": 2},
    )
    params = (ALGORITHMS, [1, 5], ["fused", "naive"])
    param_names = ["algorithm", "inner_steps", "impl"]


class LMMetaStep(_MetaStep):
    """A random Llama-shaped mlx-lm model (d=64, 2 blocks), rank-8 adapters on q and v,
    4 tasks; ``naive`` loops over tasks on mlx-lm's own LoRA layers."""

    problem = "lm"
    sizes = size({"tasks": 4, "dim": 64, "layers": 2}, {"tasks": 2, "dim": 32, "layers": 1})
    params = (["reptile", "fomaml", "maml"], [1], ["fused", "naive"])
    param_names = ["algorithm", "inner_steps", "impl"]
