"""Meta-training throughput and peak memory: the fast path against stock MLX.

Groups (each measured in one run):
- sinusoid MAML (1-40-40-1, 25 tasks, 10 shots), 1 and 5 inner steps: metapeft's
  batched learner on BLAS layers, the same algorithm written as plain MLX
  vmap + compile, and the naive per-task loop.
- a LoRA model (4 adapted 1024x1024 layers, r=8, T=16 tasks of 64 rows) for
  MAML, FOMAML, Meta-SGD and Reptile: the batched learner on :class:`metapeft.nn.LoRALinear`
  against the naive loop on stock-MLX LoRA layers.
Peak memory of one step (``mx.get_peak_memory``) goes into ``extra_info``.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from benchmarks.baselines import StockLoRALinear, mlx_vmap_compile_maml
from benchmarks.sizes import size
from metapeft.learners import FOMAML, MAML, MetaSGD, Reptile
from metapeft.nn import LoRALinear, use_blas_linear
from metapeft.tasks import Episodes, TaskConfig, TaskDistribution

SINUSOID_ROUNDS = {"rounds": 50, "iterations": 1, "warmup_rounds": 5}
NAIVE_ROUNDS = {"rounds": 5, "iterations": 1, "warmup_rounds": 1}


def mse(model, x, y):
    return nn.losses.mse_loss(model(x), y)


def sinusoid_net(seed=0):
    mx.random.seed(seed)
    model = nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def sinusoid_episodes():
    config = TaskConfig("sine", "sinusoid", 0, 1, support_size=10, query_size=10)
    episodes = TaskDistribution(config, seed=0).sample(25)
    mx.eval(episodes.support_x, episodes.support_y, episodes.query_x, episodes.query_y)
    return episodes


def _peak_memory(benchmark, fn):
    mx.synchronize()
    mx.reset_peak_memory()
    fn()
    benchmark.extra_info["peak_memory_bytes"] = mx.get_peak_memory()


@pytest.mark.parametrize("inner_steps", [1, 5])
@pytest.mark.parametrize("impl", ["fused", "mlx vmap+compile", "naive"])
def test_sinusoid_maml(benchmark, sinusoid_episodes, impl, inner_steps):
    benchmark.group = f"sinusoid MAML meta-step, {inner_steps} inner step(s), T=25"
    ep = sinusoid_episodes
    data = (ep.support_x, ep.support_y, ep.query_x, ep.query_y)
    if impl == "mlx vmap+compile":
        step, state = mlx_vmap_compile_maml(sinusoid_net(), mse, 0.01, inner_steps)

        def run():
            mx.eval(step(*data), state)

        rounds = SINUSOID_ROUNDS
    else:
        fused = impl == "fused"
        model = use_blas_linear(sinusoid_net()) if fused else sinusoid_net()
        learner = MAML(model, inner_lr=0.01, inner_steps=inner_steps, batched=fused)

        def run():
            learner.meta_train_step(ep, mse)

        rounds = SINUSOID_ROUNDS if fused else NAIVE_ROUNDS
    _peak_memory(benchmark, run)
    benchmark.pedantic(run, **rounds)


# ------------------------------------------------------------------- LoRA model
LORA = size(
    {"tasks": 16, "rows": 64, "dim": 1024, "rank": 8, "layers": 4},
    {"tasks": 2, "rows": 4, "dim": 16, "rank": 2, "layers": 2},
)


def lora_net(stock: bool, seed=0):
    mx.random.seed(seed)
    d, r = LORA["dim"], LORA["rank"]
    layers = []
    for i in range(LORA["layers"]):
        layer = (
            StockLoRALinear(d, d, r)
            if stock
            else LoRALinear.from_base(nn.Linear(d, d, bias=False), r)
        )
        layers += [layer, nn.ReLU()] if i < LORA["layers"] - 1 else [layer]
    model = nn.Sequential(*layers)
    model.freeze()
    model.unfreeze(keys=["lora_a", "lora_b"])
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def lora_episodes():
    rng = np.random.default_rng(0)
    shape = (LORA["tasks"], LORA["rows"], LORA["dim"])
    arrays = [mx.array(rng.standard_normal(shape).astype(np.float32)) for _ in range(4)]
    mx.eval(arrays)
    return Episodes(*arrays)


LEARNERS = {
    "maml": lambda m, batched: MAML(m, inner_lr=0.01, inner_steps=1, batched=batched),
    "fomaml": lambda m, batched: FOMAML(m, inner_lr=0.01, inner_steps=1, batched=batched),
    "metasgd": lambda m, batched: MetaSGD(m, inner_lr=0.01, inner_steps=1, batched=batched),
    "reptile": lambda m, batched: Reptile(m, inner_lr=0.01, inner_steps=3, batched=batched),
}


@pytest.mark.parametrize("impl", ["fused", "naive"])
@pytest.mark.parametrize("algorithm", list(LEARNERS))
def test_lora_meta_step(benchmark, lora_episodes, algorithm, impl):
    benchmark.group = (
        f"LoRA {algorithm} meta-step, T={LORA['tasks']} d={LORA['dim']} r={LORA['rank']} "
        f"{LORA['layers']} layers"
    )
    fused = impl == "fused"
    learner = LEARNERS[algorithm](lora_net(stock=not fused), fused)

    def run():
        learner.meta_train_step(lora_episodes, mse)

    _peak_memory(benchmark, run)
    benchmark.pedantic(run, rounds=10 if fused else 3, iterations=1, warmup_rounds=1)
