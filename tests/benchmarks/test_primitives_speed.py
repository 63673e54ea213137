"""Fused primitives against their pure-MLX references and a hand-written numpy twin.

Each group times one operation several ways in the same run, so ratios within a
group are comparable. Run with ``pytest tests/benchmarks --benchmark-only``; every
body ends in ``mx.eval`` because MLX is lazy.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from metapeft import ops, reference
from metapeft.bench import peers, problems
from metapeft.bench.problems import size

# PyTorch and JAX twins, when installed.
PEERS = list(peers.installed())

# Slow stock-MLX baselines (seconds per call) get few rounds.
SLOW = {"rounds": 3, "iterations": 1, "warmup_rounds": 1}
FAST = {"rounds": 200, "iterations": 1, "warmup_rounds": 20}
MEDIUM = {"rounds": 20, "iterations": 1, "warmup_rounds": 3}


# ---------------------------------------------------------------- linear 1024^3
@pytest.fixture(scope="module")
def square():
    n = size(1024, 16)
    x, w = problems.linear_problem(n, n)
    return x, w, np.array(x), np.array(w)


@pytest.mark.benchmark(group="linear 1024x1024x1024 fp32")
@pytest.mark.parametrize("impl", ["fused", "numpy", *PEERS, "mlx"])
def test_linear_square(benchmark, square, impl):
    x, w, xn, wn = square
    if impl in peers.LIBRARIES:
        fn = peers.linear(impl, x, w)
    else:
        fn = {
            "fused": lambda: mx.eval(ops.linear(x, w)),
            "numpy": lambda: xn @ wn.T,
            "mlx": lambda: mx.eval(reference.linear(x, w)),
        }[impl]
    benchmark.pedantic(fn, **(SLOW if impl == "mlx" else MEDIUM))


# ------------------------------------------- lora_linear forward + backward, per task
@pytest.fixture(scope="module")
def lora_problem():
    return problems.lora_problem(*size((16, 64, 1024, 8), (2, 4, 32, 2)))


@pytest.mark.benchmark(group="lora_linear fwd+bwd T=16 N=64 d=1024 r=8 fp32")
@pytest.mark.parametrize("impl", ["fused", "numpy", *PEERS, "reference"])
def test_lora_forward_backward(benchmark, lora_problem, impl):
    if impl in peers.LIBRARIES:
        benchmark.pedantic(peers.lora_forward_backward(impl, lora_problem), **MEDIUM)
        return
    if impl == "numpy":
        benchmark.pedantic(problems.numpy_lora_forward_backward(lora_problem), **MEDIUM)
        return
    step = problems.lora_forward_backward(impl, lora_problem)
    benchmark.pedantic(lambda: mx.eval(step()), **(MEDIUM if impl == "fused" else SLOW))


# ------------------------------------------------- task_sgd and reptile_update
TREES = {
    f"T={tasks} x {sum(math.prod(s) for s in problems.TREES[tree])} "
    f"({len(problems.TREES[tree])} arrays)": (tasks, tree)
    for tree, tasks in problems.TREE_TASKS.items()
}
UPDATE_IMPLS = ["fused", "fused compiled", "reference compiled", *PEERS, "reference"]


@pytest.fixture(scope="module", params=list(TREES), ids=list(TREES))
def trees(request):
    return request.param, problems.update_problem(*TREES[request.param])


@pytest.mark.parametrize("impl", UPDATE_IMPLS)
def test_task_sgd(benchmark, trees, impl):
    name, p = trees
    benchmark.group = f"task_sgd {name}"
    if impl in peers.LIBRARIES:
        benchmark.pedantic(peers.task_sgd(impl, p), **FAST)
        return
    fn = problems.task_sgd_fn(impl)
    benchmark.pedantic(lambda: mx.eval(fn(p["params"], p["grads"])), **FAST)


@pytest.mark.parametrize("impl", UPDATE_IMPLS)
def test_reptile_update(benchmark, trees, impl):
    name, p = trees
    benchmark.group = f"reptile_update {name}"
    if impl in peers.LIBRARIES:
        benchmark.pedantic(peers.reptile_update(impl, p), **FAST)
        return
    fn = problems.reptile_update_fn(impl)
    benchmark.pedantic(lambda: mx.eval(fn(p["meta"], p["params"])), **FAST)
