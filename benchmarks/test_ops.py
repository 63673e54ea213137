"""Fused primitives against their pure-MLX references and a hand-written numpy twin.

Each group times one operation several ways in the same run, so ratios within a
group are comparable. Run with ``pytest benchmarks --benchmark-only``; every body
ends in ``mx.eval`` because MLX is lazy.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from benchmarks.sizes import size
from metapeft import ops, reference

# Slow stock-MLX baselines (seconds per call) get few rounds.
SLOW = {"rounds": 3, "iterations": 1, "warmup_rounds": 1}
FAST = {"rounds": 200, "iterations": 1, "warmup_rounds": 20}
MEDIUM = {"rounds": 20, "iterations": 1, "warmup_rounds": 3}


def _run(benchmark, fn, settings):
    benchmark.pedantic(fn, **settings)


# ---------------------------------------------------------------- linear 1024^3
@pytest.fixture(scope="module")
def square():
    n = size(1024, 16)
    a = mx.random.normal((n, n), key=mx.random.key(0))
    b = mx.random.normal((n, n), key=mx.random.key(1))
    mx.eval(a, b)
    return a, b, np.array(a), np.array(b)


@pytest.mark.benchmark(group="linear 1024x1024x1024 fp32")
@pytest.mark.parametrize("impl", ["fused", "numpy", "mlx"])
def test_linear_square(benchmark, square, impl):
    a, b, an, bn = square
    fn = {
        "fused": lambda: mx.eval(ops.linear(a, b)),
        "numpy": lambda: an @ bn.T,
        "mlx": lambda: mx.eval(reference.linear(a, b)),
    }[impl]
    _run(benchmark, fn, SLOW if impl == "mlx" else MEDIUM)


# ------------------------------------------- lora_linear forward + backward, per task
@pytest.fixture(scope="module")
def lora_problem():
    tasks, rows, dim, rank = size((16, 64, 1024, 8), (2, 4, 32, 2))
    scale = 2.0
    k = mx.random.split(mx.random.key(2), 4)
    x = mx.random.normal((tasks, rows, dim), key=k[0])
    w = mx.random.normal((dim, dim), key=k[1]) * 0.02
    a = mx.random.normal((tasks, dim, rank), key=k[2]) * 0.02
    b = mx.random.normal((tasks, rank, dim), key=k[3]) * 0.02
    mx.eval(x, w, a, b)
    return x, w, a, b, scale


def _numpy_lora_forward_backward(x, w, a, b, scale):
    """The same maths by hand: forward, then gradients of sum(out) for x, a and b."""
    h = x @ a
    out = x @ w.T + scale * (h @ b)
    g = np.ones_like(out)
    gb = g @ b.transpose(0, 2, 1)
    dx = g @ w + scale * (gb @ a.transpose(0, 2, 1))
    da = scale * (x.transpose(0, 2, 1) @ gb)
    db = scale * (h.transpose(0, 2, 1) @ g)
    return out.sum(), dx, da, db


@pytest.mark.benchmark(group="lora_linear fwd+bwd T=16 N=64 d=1024 r=8 fp32")
@pytest.mark.parametrize("impl", ["fused", "numpy", "reference"])
def test_lora_forward_backward(benchmark, lora_problem, impl):
    x, w, a, b, scale = lora_problem
    if impl == "numpy":
        xn, wn, an, bn = (np.array(v) for v in (x, w, a, b))
        _run(benchmark, lambda: _numpy_lora_forward_backward(xn, wn, an, bn, scale), MEDIUM)
        return
    impl_mod = ops if impl == "fused" else reference

    def loss(x, a, b):
        return impl_mod.lora_linear(x, w, a, b, scale).sum()

    step = mx.value_and_grad(loss, argnums=(0, 1, 2))
    _run(benchmark, lambda: mx.eval(step(x, a, b)), MEDIUM if impl == "fused" else SLOW)


# ------------------------------------------------- task_sgd and reptile_update
TREES = {
    # Sinusoid MAML (1-40-40-1): 1,761 parameters per task, 6 arrays.
    "T=25 x 1761 (6 arrays)": (25, [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]),
    # A LoRA-sized tree: 65,536 parameters per task in 8 arrays.
    "T=16 x 65536 (8 arrays)": (16, [(size(8192, 8),)] * 8),
}


def _tree(tasks, shapes, seed):
    keys = mx.random.split(mx.random.key(seed), len(shapes))
    return {
        f"p{i}": mx.random.normal((tasks, *s), key=k)
        for i, (s, k) in enumerate(zip(shapes, keys, strict=True))
    }


@pytest.fixture(scope="module", params=list(TREES), ids=list(TREES))
def trees(request):
    tasks, shapes = TREES[request.param]
    params, grads = _tree(tasks, shapes, 3), _tree(tasks, shapes, 4)
    meta = {k: v[0] for k, v in params.items()}
    mx.eval(params, grads, meta)
    return request.param, params, grads, meta


def _update_impls(fused, ref):
    return {
        "fused": fused,
        "fused compiled": mx.compile(fused),
        "reference compiled": mx.compile(ref),
        "reference": ref,
    }


UPDATE_IMPLS = ["fused", "fused compiled", "reference compiled", "reference"]


@pytest.mark.parametrize("impl", UPDATE_IMPLS)
def test_task_sgd(benchmark, trees, impl):
    name, params, grads, _ = trees
    benchmark.group = f"task_sgd {name}"
    fn = _update_impls(
        lambda p, g: ops.task_sgd(p, g, 0.01), lambda p, g: reference.task_sgd(p, g, 0.01)
    )[impl]
    _run(benchmark, lambda: mx.eval(fn(params, grads)), FAST)


@pytest.mark.parametrize("impl", UPDATE_IMPLS)
def test_reptile_update(benchmark, trees, impl):
    name, params, _, meta = trees
    benchmark.group = f"reptile_update {name}"
    fn = _update_impls(
        lambda m, p: ops.reptile_update(m, p, 0.1),
        lambda m, p: reference.reptile_update(m, p, 0.1),
    )[impl]
    _run(benchmark, lambda: mx.eval(fn(meta, params)), FAST)
