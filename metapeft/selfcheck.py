"""Check an install: every fused primitive against its pure-MLX reference.

Runs each op of :mod:`metapeft.ops` and its twin in :mod:`metapeft.reference` on
a small meta-batch (values and gradients), times both, and prints one line per
op. ``metapeft validate`` runs it and exits non-zero if any op disagrees.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

import metapeft
from metapeft import ops, reference
from metapeft.bench.runner import BenchmarkRunner

# Largest |fused - reference| accepted, relative to the reference's scale.
TOLERANCE = 1e-4


def _time_ms(fn: Callable[[], Any], repeats: int = 5) -> float:
    op = BenchmarkRunner("selfcheck").measure("op", fn, repeat=repeats, warmup=1)
    return min(op.seconds) * 1e3


def _max_rel_error(got: Any, expected: Any) -> float:
    worst = 0.0
    for (_, g), (_, e) in zip(tree_flatten(got), tree_flatten(expected), strict=True):
        scale = max(mx.abs(e).max().item(), 1.0) if e.size else 1.0
        if g.size:
            worst = max(worst, mx.abs(g - e).max().item() / scale)
    return worst


def _cases(tasks: int = 16, rows: int = 64, dim: int = 256, rank: int = 8) -> dict[str, tuple]:
    """(fused, reference) callables per op, each returning values and gradients."""
    key = mx.random.key(0)
    k1, k2, k3, k4 = mx.random.split(key, 4)
    x = mx.random.normal((tasks, rows, dim), key=k1)
    weight = mx.random.normal((dim, dim), key=k2) / dim**0.5
    lora_a = mx.random.normal((tasks, dim, rank), key=k3) / dim**0.5
    lora_b = mx.random.normal((tasks, rank, dim), key=k4) / rank**0.5
    params = {"w": mx.random.normal((tasks, dim, 4)), "b": [mx.random.normal((tasks, 4))]}
    grads = {"w": mx.random.normal((tasks, dim, 4)), "b": [mx.random.normal((tasks, 4))]}
    meta = {"w": params["w"][0], "b": [params["b"][0][0]]}
    mx.eval(x, weight, lora_a, lora_b, params, grads, meta)

    def lora_fn(impl: Any) -> Callable[[], Any]:
        loss = lambda a, b: (impl.lora_linear(x, weight, a, b, 2.0) ** 2).mean()  # noqa: E731
        return lambda: mx.value_and_grad(loss, argnums=(0, 1))(lora_a, lora_b)

    def linear_fn(impl: Any) -> Callable[[], Any]:
        loss = lambda xx: (impl.linear(xx, weight) ** 2).mean()  # noqa: E731
        return lambda: mx.value_and_grad(loss)(x)

    return {
        "linear (value and grad)": (linear_fn(ops), linear_fn(reference)),
        "lora_linear per-task (value and grad)": (lora_fn(ops), lora_fn(reference)),
        "task_sgd": (
            lambda: ops.task_sgd(params, grads, 0.01),
            lambda: reference.task_sgd(params, grads, 0.01),
        ),
        "reptile_update": (
            lambda: ops.reptile_update(meta, params, 0.1),
            lambda: reference.reptile_update(meta, params, 0.1),
        ),
    }


def run() -> bool:
    """Prints one line per op and returns True when all agree with the reference."""
    print(
        f"metapeft {metapeft.__version__} | mlx {mx.__version__} | "
        f"{platform.system()} {platform.machine()} | device {mx.default_device()}"
    )
    ok = True
    for name, (fused, ref) in _cases().items():
        error = _max_rel_error(fused(), ref())
        t_fused, t_ref = _time_ms(fused), _time_ms(ref)
        status = "ok" if error <= TOLERANCE else "MISMATCH"
        ok &= status == "ok"
        print(
            f"  {status:8s} {name:40s} max rel err {error:.1e}  "
            f"fused {t_fused:8.3f} ms  reference {t_ref:8.3f} ms  ({t_ref / t_fused:5.1f}x)"
        )
    print("all fused ops agree with the reference" if ok else "some fused ops disagree")
    return ok


def run_learner(config: Any, tasks: int = 4) -> bool:
    """One meta-step of ``config``'s learner, fused and naive, on the same tasks; True if
    they agree. Prints one line."""
    from metapeft import training

    episodes = training.task_distributions(config)[0].sample(tasks)
    results = []
    timer = BenchmarkRunner("selfcheck")
    for batched in (True, False):
        learner = training.build_learner(config, training.build_model(config))
        learner.batched = batched
        with timer.time_operation("meta_train_step", batched=batched) as op:
            metrics = learner.meta_train_step(episodes)
        results.append((metrics, learner.meta_parameters(), op.seconds[-1] * 1e3))
    (fast, fast_meta, t_fast), (naive, naive_meta, t_naive) = results
    error = _max_rel_error(fast_meta, naive_meta)
    ok = error <= TOLERANCE and all(
        abs(fast[k] - naive[k]) <= TOLERANCE * max(1.0, abs(naive[k])) for k in naive
    )
    print(
        f"  {'ok' if ok else 'MISMATCH':8s} {config.training.algorithm} meta-step "
        f"({config.task.family}, {tasks} tasks)          max rel err {error:.1e}  "
        f"batched {t_fast:8.3f} ms  naive {t_naive:8.3f} ms (first call, compiles)"
    )
    return ok
