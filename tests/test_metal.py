"""The Metal kernels give the CPU results: each op run on ``mx.gpu`` against ``mx.cpu``.

Skipped where Metal is not available (everywhere but Apple silicon).
"""

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from conftest import (
    DTYPES,
    LAYOUTS,
    LayerShape,
    assert_tree_close,
    coarsest,
    dot_loss,
    leaves,
    like,
    nest,
    rand,
    tol,
)
from metapeft import ops

pytestmark = [
    pytest.mark.apple_silicon,
    pytest.mark.skipif(
        not mx.metal.is_available(),
        reason="Metal is not available: the GPU kernels run only on Apple silicon",
    ),
]

# float32, float16, bfloat16, and the operands cycling through all three.
DTYPE_SETS = ["float32", "float16", "bfloat16", "mixed"]

# (shape, bias kind, weight shared by all tasks), with empty d_in, rows, d_out and r.
LAYERS = [
    (LayerShape(False, 1, (2, 3), 5, 4, 2), "shared", False),
    (LayerShape(False, 1, (40,), 64, 300, 8), None, False),
    (LayerShape(True, 3, (2,), 6, 4, 3), "task", False),
    (LayerShape(True, 2, (), 7, 33, 1), "shared", True),
    (LayerShape(False, 1, (3,), 0, 4, 2), "shared", False),
    (LayerShape(True, 2, (0,), 5, 4, 2), "task", False),
    (LayerShape(False, 1, (3,), 5, 0, 2), None, False),
    (LayerShape(True, 2, (3,), 5, 4, 0), "shared", True),
]
LAYER_IDS = [
    f"{'task' if s.per_task else 'single'}-x{'x'.join(map(str, s.x))}-out{s.d_out}-r{s.r}"
    for s, _, _ in LAYERS
]


def dtypes_for(name: str, n: int) -> list[mx.Dtype]:
    if name == "mixed":
        return [DTYPES[i % len(DTYPES)] for i in range(n)]
    return [getattr(mx, name)] * n


def run_on(device: mx.Device, fn: Callable, *args: Any) -> Any:
    with mx.stream(device):
        out = fn(*args)
        mx.eval(out)
    return out


def check_gpu(fn: Callable, args: list[Any], k: int = 1) -> None:
    """``fn(*args)`` on the GPU equals it on the CPU: shapes, dtypes and values."""
    mx.eval([a for a in leaves(args) if isinstance(a, mx.array)])
    cpu = run_on(mx.cpu, fn, *args)
    gpu = run_on(mx.gpu, fn, *args)
    dtypes = [o.dtype for o in leaves(cpu)]
    assert_tree_close(gpu, cpu, dtypes, rtol=tol(coarsest(*dtypes), k), label="gpu vs cpu")


def layer_args(
    rng: np.random.Generator, case: tuple, dtypes: str, layout: str, lora: bool
) -> list[Any]:
    s, bias, shared = case
    shapes = [s.x, s.weight[1:] if shared else s.weight]
    if lora:
        shapes += [s.lora_a, s.lora_b]
    if bias is not None:
        shapes.append(s.bias(bias))
    arrays = [
        rand(rng, sh, dt, layout)
        for sh, dt in zip(shapes, dtypes_for(dtypes, len(shapes)), strict=True)
    ]
    if lora:
        arrays.insert(4, 0.75)
    if bias is None:
        arrays.append(None)
    return arrays


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtypes", DTYPE_SETS)
@pytest.mark.parametrize("case", LAYERS, ids=LAYER_IDS)
def test_linear(case: tuple, dtypes: str, layout: str) -> None:
    args = layer_args(np.random.default_rng(0), case, dtypes, layout, lora=False)
    check_gpu(ops.linear, args, k=case[0].d_in)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtypes", DTYPE_SETS)
@pytest.mark.parametrize("case", LAYERS, ids=LAYER_IDS)
def test_lora_linear(case: tuple, dtypes: str, layout: str) -> None:
    args = layer_args(np.random.default_rng(1), case, dtypes, layout, lora=True)
    check_gpu(ops.lora_linear, args, k=case[0].d_in + case[0].r)


@pytest.mark.parametrize("dtypes", DTYPE_SETS)
@pytest.mark.parametrize("case", LAYERS, ids=LAYER_IDS)
def test_lora_linear_grad(case: tuple, dtypes: str) -> None:
    rng = np.random.default_rng(2)
    args = layer_args(rng, case, dtypes, "transposed", lora=True)
    argnums = tuple(i for i, a in enumerate(args) if isinstance(a, mx.array))
    cot = like(rng, ops.lora_linear(*args))
    grad = mx.grad(lambda *a: dot_loss(ops.lora_linear(*a), cot), argnums=argnums)
    s = case[0]
    check_gpu(lambda *a: list(grad(*a)), args, k=max(s.rows * s.T, s.d_in, s.d_out) + s.r)


# (T, leaf shapes without the task axis): scalars, an empty leaf, no tasks.
TREES = [(3, [(4, 3), (5,), ()]), (2, [(0, 3), (6,)]), (1, [(2, 3, 4)]), (0, [(3,)])]
TREE_IDS = [f"T{t}-{len(sh)}leaves" for t, sh in TREES]


@pytest.mark.parametrize("lr_kind", ["float", "array", "tree"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtypes", DTYPE_SETS)
@pytest.mark.parametrize("tree", TREES, ids=TREE_IDS)
def test_task_sgd(tree: tuple, dtypes: str, layout: str, lr_kind: str) -> None:
    rng = np.random.default_rng(3)
    t, shapes = tree
    p_dt, g_dt, lr_dt = dtypes_for(dtypes, 3)
    params = nest([rand(rng, (t, *sh), p_dt, layout) for sh in shapes])
    grads = nest([rand(rng, (t, *sh), g_dt, layout) for sh in shapes])
    if lr_kind == "float":
        lr = 0.1
    elif lr_kind == "array":
        lr = rand(rng, (), lr_dt)
    else:  # per-leaf rates broadcasting over the task axis (Meta-SGD)
        lr = nest([rand(rng, sh, lr_dt, layout) for sh in shapes])
    check_gpu(ops.task_sgd, [params, grads, lr])


@pytest.mark.parametrize("eps_kind", ["float", "array"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtypes", DTYPE_SETS)
@pytest.mark.parametrize("tree", TREES, ids=TREE_IDS)
def test_reptile_update(tree: tuple, dtypes: str, layout: str, eps_kind: str) -> None:
    rng = np.random.default_rng(4)
    t, shapes = tree
    p_dt, a_dt, eps_dt = dtypes_for(dtypes, 3)
    params = nest([rand(rng, sh, p_dt, layout) for sh in shapes])
    adapted = nest([rand(rng, (t, *sh), a_dt, layout) for sh in shapes])
    eps = 0.3 if eps_kind == "float" else rand(rng, (), eps_dt)
    check_gpu(ops.reptile_update, [params, adapted, eps], k=max(t, 1))
