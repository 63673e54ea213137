"""The standard benchmark suite of ``metapeft bench``.

Four parts, all timed by one :class:`~metapeft.bench.runner.BenchmarkRunner`:

- comparisons: each fused primitive and learner beside its pure-MLX reference,
  numpy twin, PyTorch and JAX twins (when installed, :mod:`~metapeft.bench.peers`),
  plain-MLX ``vmap`` + ``compile`` version or naive per-task loop;
- scaling: a meta-step's cost against tasks per meta-batch ``T``, LoRA rank and
  inner steps;
- language models: a LoRA meta-step on random mlx-lm Llamas (tiny, and d=2048 with 16
  blocks), fused against the naive loop on mlx-lm's own LoRA layers;
- pretrained-model shapes (:mod:`~metapeft.bench.real_model`, SmolLM2-135M): a LoRA
  forward+backward against PyTorch (transformers + peft) and stock mlx-lm, and a FOMAML
  meta-step against PyTorch's loop over tasks, timed in turns; and, with the ``serve``
  extra installed, ``metapeft serve``'s decoding of 8 streams on 8 adapters in one batch
  against 8 on one adapter and the 8 served adapter by adapter
  (:mod:`~metapeft.bench.serving`);
- capacity: peak memory of a MAML step of a d=4096 LoRA model against ``T``, from
  which the report extrapolates the largest ``T`` that fits in memory.

Operations that differ only in ``impl`` form a comparison; operations that differ
only in one numeric parameter form a sweep (see :mod:`metapeft.bench.report`).
"""

from __future__ import annotations

import gc
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from metapeft.bench import peers, problems, real_model, serving
from metapeft.bench.runner import BenchmarkRunner


@dataclass
class Case:
    """One operation to time: ``build()`` returns the function to call."""

    label: str
    params: dict[str, Any]
    build: Callable[[], Callable[[], Any]]
    repeat: int = 10
    min_time: float = 0.0
    warmup: int = 1
    number: int = 1  # calls per timed sample (for microsecond-scale operations)
    # Timed in turns with the other interleaved cases of its label (params {"impl": ...}).
    interleave: bool = False


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one suite run."""

    linear_dim: int
    lora_op: tuple[int, int, int, int]  # tasks, rows, dim, rank
    lora_model: dict[str, int]  # tasks, rows, dim, rank, layers
    lora_tasks: tuple[int, ...]
    lora_ranks: tuple[int, ...]
    lora_inner_steps: tuple[int, ...]
    sinusoid_tasks: tuple[int, ...]
    sinusoid_inner_steps: tuple[int, ...]
    capacity_dim: int
    capacity_tasks: tuple[int, ...]
    lm_small: dict[str, int]  # tasks, dim, layers of a random mlx-lm Llama
    lm_large: dict[str, int] | None
    real_model: str  # a shape of metapeft.bench.real_model.SHAPES
    real_model_stock: bool  # also time stock mlx-lm's LoRA step (slow: a reference BLAS)
    naive_repeat: int
    slow_repeat: int
    fast_repeat: int
    fast_number: int
    min_time: float  # seconds to keep repeating a fast meta-step


FULL = Sizes(
    linear_dim=1024,
    lora_op=(16, 64, 1024, 8),
    lora_model={"tasks": 16, "rows": 64, "dim": 1024, "rank": 8, "layers": 4},
    lora_tasks=(1, 2, 4, 8, 16, 32, 64),
    lora_ranks=(1, 2, 4, 8, 16, 32, 64, 128),
    lora_inner_steps=(1, 2, 3, 5, 8),
    sinusoid_tasks=(1, 5, 25, 100, 400),
    sinusoid_inner_steps=(1, 2, 5, 10),
    capacity_dim=4096,
    capacity_tasks=(1, 2, 4, 8, 16, 32),
    lm_small={"tasks": 4, "dim": 64, "layers": 2},
    lm_large={"tasks": 4, "dim": 2048, "layers": 16},
    real_model="smollm2-135m",
    real_model_stock=True,
    naive_repeat=3,
    slow_repeat=3,
    fast_repeat=30,
    fast_number=100,
    min_time=0.5,
)

QUICK = Sizes(
    linear_dim=512,
    lora_op=(4, 64, 512, 8),
    lora_model={"tasks": 8, "rows": 32, "dim": 256, "rank": 8, "layers": 2},
    lora_tasks=(1, 4, 8, 16),
    lora_ranks=(2, 8, 32),
    lora_inner_steps=(1, 2, 5),
    sinusoid_tasks=(5, 25, 100),
    sinusoid_inner_steps=(1, 2, 5),
    capacity_dim=1024,
    capacity_tasks=(1, 2, 4),
    lm_small={"tasks": 4, "dim": 64, "layers": 2},
    lm_large=None,
    real_model="smollm2-135m",
    real_model_stock=False,
    naive_repeat=1,
    slow_repeat=2,
    fast_repeat=10,
    fast_number=50,
    min_time=0.2,
)

TINY = Sizes(
    linear_dim=16,
    lora_op=(2, 4, 16, 2),
    lora_model={"tasks": 2, "rows": 4, "dim": 16, "rank": 2, "layers": 2},
    lora_tasks=(1, 2, 3),
    lora_ranks=(1, 2, 3),
    lora_inner_steps=(1, 2, 3),
    sinusoid_tasks=(1, 2, 3),
    sinusoid_inner_steps=(1, 2, 3),
    capacity_dim=16,
    capacity_tasks=(1, 2, 3),
    lm_small={"tasks": 2, "dim": 32, "layers": 1},
    lm_large=None,
    real_model="tiny",
    real_model_stock=True,
    naive_repeat=1,
    slow_repeat=1,
    fast_repeat=2,
    fast_number=2,
    min_time=0.0,
)


def sizes(quick: bool) -> Sizes:
    """:data:`QUICK` or :data:`FULL`; :data:`TINY` when ``METAPEFT_BENCH_SIZE=tiny``."""
    if os.environ.get("METAPEFT_BENCH_SIZE") == "tiny":
        return TINY
    return QUICK if quick else FULL


def _linear(impl: str, dim: int) -> Callable[[], Any]:
    x, w = problems.linear_problem(dim, dim)
    if impl in peers.LIBRARIES:
        return peers.linear(impl, x, w)
    if impl == "numpy":
        import numpy as np

        xn, wn = np.array(x), np.array(w)
        return lambda: xn @ wn.T
    from metapeft import ops, reference

    f = (ops if impl == "fused" else reference).linear
    return lambda: f(x, w)


def _lora_fwd_bwd(impl: str, sizes: tuple[int, int, int, int]) -> Callable[[], Any]:
    p = problems.lora_problem(*sizes)
    if impl.split()[0] in peers.LIBRARIES:
        return peers.lora_forward_backward(impl, p)
    if impl == "numpy":
        return problems.numpy_lora_forward_backward(p)
    return problems.lora_forward_backward(impl, p)


def _update(op: str, impl: str, tasks: int, tree: str) -> Callable[[], Any]:
    p = problems.update_problem(tasks, tree)
    if impl in peers.LIBRARIES:
        return (peers.task_sgd if op == "task_sgd" else peers.reptile_update)(impl, p)
    if op == "task_sgd":
        fn = problems.task_sgd_fn(impl)
        return lambda: fn(p["params"], p["grads"])
    fn = problems.reptile_update_fn(impl)
    return lambda: fn(p["meta"], p["params"])


def cases(sizes: Sizes) -> Iterator[Case]:
    """Every case of the suite, comparisons first, then sweeps, then capacity."""
    s = sizes
    d = s.linear_dim
    # PyTorch and JAX, when installed, are timed in turns with the fused paths.
    installed = peers.installed()
    for impl in ("fused", "numpy", *installed, "reference"):
        yield Case(
            f"linear {d}x{d}x{d} fp32",
            {"impl": impl},
            lambda impl=impl: _linear(impl, d),
            repeat=s.slow_repeat if impl == "reference" else 20,
            interleave=impl != "reference",
        )
    t, n, dim, r = s.lora_op
    compiled = ("torch compiled",) if "torch" in installed else ()
    for impl in ("fused", "numpy", *installed, *compiled, "reference"):
        yield Case(
            f"lora_linear fwd+bwd T={t} N={n} d={dim} r={r} fp32",
            {"impl": impl},
            lambda impl=impl: _lora_fwd_bwd(impl, s.lora_op),
            repeat=s.slow_repeat if impl == "reference" else 20,
            interleave=impl != "reference",
        )
    for op in ("task_sgd", "reptile_update"):
        for tree, tasks in problems.TREE_TASKS.items():
            for impl in ("fused", "fused compiled", "reference compiled", *installed, "reference"):
                yield Case(
                    f"{op} {tree} tree T={tasks}",
                    {"impl": impl},
                    lambda op=op, impl=impl, tasks=tasks, tree=tree: _update(op, impl, tasks, tree),
                    repeat=s.fast_repeat,
                    warmup=10,
                    number=s.fast_number,
                    interleave=True,
                )

    sin_t = 25 if 25 in s.sinusoid_tasks else s.sinusoid_tasks[-1]
    jax = ("jax",) if "jax" in installed else ()
    for steps in (1, 5):
        for impl in ("fused", "mlx", *jax, "naive"):
            yield _meta_case("sinusoid", "maml", impl, s, tasks=sin_t, inner_steps=steps)
    for algorithm in problems.ALGORITHMS:
        for impl in ("fused", "naive"):
            yield _meta_case("lora", algorithm, impl, s, inner_steps=1, **s.lora_model)

    for algorithm in ("reptile", "fomaml", "maml"):
        for impl in ("fused", "naive"):
            yield _meta_case("lm", algorithm, impl, s, inner_steps=1, **s.lm_small)
    if s.lm_large:
        for impl in ("fused", "naive"):
            yield _meta_case("lm", "fomaml", impl, s, inner_steps=1, repeat=1, **s.lm_large)

    shape = s.real_model
    torch = ("torch",) if "torch" in installed else ()
    stock = ("mlx-lm",) if s.real_model_stock else ()
    for impl in ("fused", *torch, *stock):
        yield Case(
            f"{shape} LoRA fwd+bwd 4x64 tokens fp32",
            {"impl": impl},
            lambda impl=impl: real_model.lora_step(shape, impl),
            repeat=s.slow_repeat,
            interleave=True,
        )
    for impl in ("fused", *torch):
        yield Case(
            f"{shape} FOMAML meta-step T=4 4+4x16 tokens fp32",
            {"impl": impl},
            lambda impl=impl: real_model.meta_step(shape, impl),
            repeat=s.slow_repeat,
            interleave=True,
        )
    if importlib.util.find_spec("prometheus_client") is not None:  # the serve extra
        for impl in serving.IMPLS:
            yield Case(
                f"{shape} serve 8 streams x 32 tokens fp32",
                {"impl": impl},
                lambda impl=impl: serving.decode(shape, impl, streams=8, tokens=32),
                repeat=s.slow_repeat,
                interleave=True,
            )

    for tasks in s.sinusoid_tasks:
        yield _meta_case("sinusoid", "maml", "fused", s, tasks=tasks, inner_steps=1)
    for steps in s.sinusoid_inner_steps:
        yield _meta_case("sinusoid", "maml", "fused", s, tasks=sin_t, inner_steps=steps)
    base = dict(s.lora_model)
    for tasks in s.lora_tasks:
        yield _meta_case("lora", "maml", "fused", s, inner_steps=1, **{**base, "tasks": tasks})
    for rank in s.lora_ranks:
        yield _meta_case("lora", "maml", "fused", s, inner_steps=1, **{**base, "rank": rank})
    for steps in s.lora_inner_steps:
        yield _meta_case("lora", "maml", "fused", s, inner_steps=steps, **base)

    big = {**base, "dim": s.capacity_dim}
    for tasks in s.capacity_tasks:
        yield _meta_case(
            "lora", "maml", "fused", s, inner_steps=1, repeat=1, **{**big, "tasks": tasks}
        )


def _meta_case(
    problem: str, algorithm: str, impl: str, s: Sizes, *, repeat: int | None = None, **kw: int
) -> Case:
    if repeat is None:
        repeat = s.naive_repeat if impl == "naive" else 5
    label = f"{problem} {algorithm} meta-step"
    return Case(
        label,
        {"impl": impl, **kw},
        lambda: problems.meta_step(problem, algorithm, impl, **kw),
        repeat=repeat,
        min_time=0.0 if impl == "naive" else s.min_time,
        warmup=0 if impl == "naive" else 1,
    )


def run(sizes: Sizes, runner: BenchmarkRunner, progress: Any = None) -> list[dict[str, Any]]:
    """Time every case of ``sizes`` not yet recorded by ``runner``; return the failures.

    A case that raises is recorded as failed (label, parameters, error) and the
    suite goes on; ``progress`` is an optional ``rich.progress.Progress``.
    """
    todo = [c for c in cases(sizes) if runner.operation(c.label, **c.params) is None]
    unique = {(c.label, repr(sorted(c.params.items()))): c for c in todo}
    bar = progress.add_task("benchmarks", total=len(unique)) if progress else None
    failures = []
    groups: dict[Any, list[Case]] = {}
    for key, case in unique.items():
        groups.setdefault(case.label if case.interleave else key, []).append(case)
    for group in groups.values():
        case = group[0]
        if progress:
            params = ", ".join(f"{k}={v}" for c in group for k, v in c.params.items())
            progress.update(bar, description=f"{case.label} [{params}]")
        try:
            if case.interleave:
                fns = {c.params["impl"]: c.build() for c in group}
                runner.measure_interleaved(
                    case.label, fns, repeat=case.repeat, warmup=case.warmup, number=case.number
                )
            else:
                runner.measure(
                    case.label,
                    case.build(),
                    repeat=case.repeat,
                    warmup=case.warmup,
                    min_time=case.min_time,
                    number=case.number,
                    **case.params,
                )
        except Exception as e:  # noqa: BLE001 - reported as a failed benchmark
            failures += [{"label": c.label, "params": c.params, "error": repr(e)} for c in group]
        fns = None
        gc.collect()
        mx.clear_cache()
        if progress:
            progress.advance(bar, len(group))
    return failures
