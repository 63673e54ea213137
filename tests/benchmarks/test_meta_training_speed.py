"""Meta-training throughput and peak memory: the fast path against stock MLX.

Groups (each measured in one run):
- sinusoid MAML (1-40-40-1, 25 tasks, 10 shots), 1 and 5 inner steps: metapeft's
  batched learner on BLAS layers, the same algorithm written as plain MLX
  vmap + compile, and the naive per-task loop.
- a LoRA model (4 adapted 1024x1024 layers, r=8, T=16 tasks of 64 rows) for
  MAML, FOMAML, Meta-SGD and Reptile: the batched learner on :class:`metapeft.nn.LoRALinear`
  against the naive loop on stock-MLX LoRA layers.
- a random Llama-shaped mlx-lm model (d=64, 2 blocks, T=4) for Reptile, FOMAML
  and MAML: every task at once against the naive loop on mlx-lm's LoRA layers.
Peak memory of one step (``mx.get_peak_memory``) goes into ``extra_info``.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from metapeft.bench import problems
from metapeft.bench.problems import size

FUSED_ROUNDS = {"rounds": 50, "iterations": 1, "warmup_rounds": 5}
NAIVE_ROUNDS = {"rounds": 5, "iterations": 1, "warmup_rounds": 1}


def _peak_memory(benchmark, fn):
    mx.synchronize()
    mx.reset_peak_memory()
    fn()
    benchmark.extra_info["peak_memory_bytes"] = mx.get_peak_memory()


@pytest.mark.parametrize("inner_steps", [1, 5])
@pytest.mark.parametrize("impl", ["fused", "mlx", "naive"])
def test_sinusoid_maml(benchmark, impl, inner_steps):
    benchmark.group = f"sinusoid MAML meta-step, {inner_steps} inner step(s), T=25"
    run = problems.meta_step("sinusoid", "maml", impl, tasks=size(25, 2), inner_steps=inner_steps)
    _peak_memory(benchmark, run)
    benchmark.pedantic(run, **(NAIVE_ROUNDS if impl == "naive" else FUSED_ROUNDS))


LORA = size(
    {"tasks": 16, "rows": 64, "dim": 1024, "rank": 8, "layers": 4},
    {"tasks": 2, "rows": 4, "dim": 16, "rank": 2, "layers": 2},
)


@pytest.mark.parametrize("impl", ["fused", "naive"])
@pytest.mark.parametrize("algorithm", problems.ALGORITHMS)
def test_lora_meta_step(benchmark, algorithm, impl):
    benchmark.group = (
        f"LoRA {algorithm} meta-step, T={LORA['tasks']} d={LORA['dim']} r={LORA['rank']} "
        f"{LORA['layers']} layers"
    )
    inner_steps = 3 if algorithm == "reptile" else 1
    run = problems.meta_step("lora", algorithm, impl, inner_steps=inner_steps, **LORA)
    _peak_memory(benchmark, run)
    benchmark.pedantic(run, rounds=10 if impl == "fused" else 3, iterations=1, warmup_rounds=1)


LM = size({"tasks": 4, "dim": 64, "layers": 2}, {"tasks": 2, "dim": 32, "layers": 1})


@pytest.mark.parametrize("impl", ["fused", "naive"])
@pytest.mark.parametrize("algorithm", ["reptile", "fomaml", "maml"])
def test_lm_meta_step(benchmark, algorithm, impl):
    benchmark.group = (
        f"LM {algorithm} meta-step, random Llama d={LM['dim']} {LM['layers']} blocks, "
        f"T={LM['tasks']}"
    )
    run = problems.meta_step("lm", algorithm, impl, inner_steps=1, **LM)
    _peak_memory(benchmark, run)
    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)
