"""ops.linear: ``x @ weight.T + bias`` with one weight, or one weight per task."""

import itertools
import os
import subprocess
import sys
import textwrap

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import (
    BAD_DTYPES,
    DTYPES,
    LAYOUTS,
    LayerShape,
    assert_close,
    axes_id,
    batched,
    check_compile,
    check_grads,
    check_grads_fd,
    check_jvp,
    check_raises,
    check_second_order,
    check_vmap,
    coarsest,
    dtype_name,
    in_axes_combos,
    layer_shapes,
    layouts,
    loop_vmap,
    np_linear,
    promote,
    rand,
    seeds,
    to_np,
    tol,
)
from metapeft import ops, reference

BIAS_KINDS = [None, "shared", "task"]
NAMES = ("x", "weight", "bias")
SMALL = {False: LayerShape(False, 1, (3,), 4, 3), True: LayerShape(True, 2, (3,), 4, 3)}


def make_args(rng, shape, dtypes, bias_kind, lay=("contiguous",) * 3):
    """(x, weight, bias-or-None) of ``shape``; ``dtypes`` is one dtype or one per input."""
    if not isinstance(dtypes, (list, tuple)):
        dtypes = (dtypes,) * 3
    b_shape = shape.bias(bias_kind)
    return [
        rand(rng, shape.x, dtypes[0], lay[0]),
        rand(rng, shape.weight, dtypes[1], lay[1]),
        None if b_shape is None else rand(rng, b_shape, dtypes[2], lay[2]),
    ]


def present(args):
    """The inputs that are not None, with the op and reference over exactly those."""
    args = [a for a in args if a is not None]
    return args, (lambda *a: ops.linear(*a)), (lambda *a: reference.linear(*a)), NAMES


def check_values(x, w, b, k):
    out_dtype = promote(*(a.dtype for a in (x, w, b) if a is not None))
    rtol = tol(coarsest(*(a.dtype for a in (x, w, b) if a is not None)), k)
    out = ops.linear(x, w, b)
    expected = np_linear(to_np(x), to_np(w), None if b is None else to_np(b))
    assert_close(out, reference.linear(x, w, b), out_dtype, rtol=rtol, label="vs reference")
    assert_close(out, expected, out_dtype, rtol=rtol, label="vs numpy")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@given(
    shape=layer_shapes(),
    bias_kind=st.sampled_from(BIAS_KINDS),
    lay=st.tuples(layouts, layouts, layouts),
    seed=seeds,
)
def test_values(dtype, shape, bias_kind, lay, seed):
    x, w, b = make_args(np.random.default_rng(seed), shape, dtype, bias_kind, lay)
    check_values(x, w, b, k=shape.d_in)


@pytest.mark.parametrize("per_task", [False, True], ids=["single", "per_task"])
@pytest.mark.parametrize(
    "dtypes",
    list(itertools.product(DTYPES, repeat=3)),
    ids=lambda ds: "-".join(map(dtype_name, ds)),
)
def test_mixed_dtypes_promote(dtypes, per_task):
    shape = LayerShape(per_task, 2, (3,), 5, 4)
    x, w, b = make_args(np.random.default_rng(0), shape, dtypes, "task")
    check_values(x, w, b, k=shape.d_in)


@pytest.mark.parametrize("which", ["x", "weight", "bias", "all"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("per_task", [False, True], ids=["single", "per_task"])
def test_noncontiguous(per_task, layout, which):
    shape = LayerShape(per_task, 3, (4, 2), 6, 5)
    lay = tuple(layout if which in (n, "all") else "contiguous" for n in NAMES)
    for dtype in DTYPES:
        x, w, b = make_args(np.random.default_rng(1), shape, dtype, "task", lay)
        check_values(x, w, b, k=shape.d_in)


LARGE = [
    pytest.param(LayerShape(False, 1, (4, 96), 1024, 384), id="single-384x1024"),
    pytest.param(LayerShape(True, 8, (64,), 512, 256), id="per_task-T8"),
]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "swapped", "strided", "broadcast"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=dtype_name)
@pytest.mark.parametrize("shape", LARGE)
def test_large_shapes(shape, dtype, layout):
    """Sizes where BLAS blocks and threads, values and gradients."""
    rng = np.random.default_rng(13)
    x, w, b = make_args(rng, shape, dtype, "task", (layout,) * 3)
    check_values(x, w, b, k=shape.d_in)
    args, op_fn, ref_fn, names = present([x, w, b])
    check_grads(op_fn, ref_fn, args, names, rng, k=shape.rows * shape.T)


EMPTY = [
    pytest.param(LayerShape(True, 0, (3,), 4, 5), id="T=0"),
    pytest.param(LayerShape(False, 1, (0,), 4, 5), id="N=0"),
    pytest.param(LayerShape(False, 1, (2, 0), 4, 5), id="N=0-rank3"),
    pytest.param(LayerShape(True, 2, (0,), 4, 5), id="N=0-per_task"),
    pytest.param(LayerShape(False, 1, (3,), 0, 5), id="d_in=0"),
    pytest.param(LayerShape(True, 2, (3,), 0, 5), id="d_in=0-per_task"),
    pytest.param(LayerShape(False, 1, (3,), 4, 0), id="d_out=0"),
    pytest.param(LayerShape(True, 2, (3,), 4, 0), id="d_out=0-per_task"),
]


@pytest.mark.parametrize("bias_kind", BIAS_KINDS)
@pytest.mark.parametrize("shape", EMPTY)
def test_empty_dims(shape, bias_kind):
    rng = np.random.default_rng(2)
    for dtype in DTYPES:
        x, w, b = make_args(rng, shape, dtype, bias_kind)
        check_values(x, w, b, k=1)
        if shape.d_in == 0:
            # Nothing to sum: the output is the bias (or zeros), broadcast over the rows.
            expected = np.broadcast_to(
                np_linear(
                    np.zeros(shape.x), np.zeros(shape.weight), None if b is None else to_np(b)
                ),
                shape.x[:-1] + (shape.d_out,),
            )
            assert_close(ops.linear(x, w, b), expected, dtype, label="d_in=0 gives the bias")
    args, op_fn, ref_fn, names = present(make_args(rng, shape, mx.float32, bias_kind))
    check_grads(op_fn, ref_fn, args, names, rng)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@given(shape=layer_shapes(), bias_kind=st.sampled_from(BIAS_KINDS), seed=seeds)
def test_grads_match_reference(dtype, shape, bias_kind, seed):
    rng = np.random.default_rng(seed)
    args, op_fn, ref_fn, names = present(make_args(rng, shape, dtype, bias_kind))
    k = max(shape.d_in, shape.d_out, shape.rows * shape.T)
    check_grads(op_fn, ref_fn, args, names, rng, k=k)


@pytest.mark.parametrize("bias_kind", BIAS_KINDS)
@pytest.mark.parametrize("per_task", [False, True], ids=["single", "per_task"])
def test_grads_finite_differences(per_task, bias_kind):
    rng = np.random.default_rng(3)
    lay = ("transposed", "strided", "broadcast")
    args, op_fn, _, names = present(make_args(rng, SMALL[per_task], mx.float32, bias_kind, lay))
    check_grads_fd(op_fn, args, names, rng)


@pytest.mark.parametrize("inner", [0, 1, 2], ids=lambda i: f"d{NAMES[i]}")
@pytest.mark.parametrize("per_task", [False, True], ids=["single", "per_task"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16], ids=dtype_name)
def test_second_order(dtype, per_task, inner):
    rng = np.random.default_rng(4)
    args, op_fn, ref_fn, names = present(make_args(rng, SMALL[per_task], dtype, "task"))
    check_second_order(op_fn, ref_fn, args, names, inner, rng, k=12)


def linear_gradient(fn, cot):
    """``(x, w, b) -> (dx, dw, db)`` of ``sum(cot * sin(fn(x, w, b)))``: the gradient's
    own products are ``g @ w`` and the row-summed outer products."""
    return mx.grad(lambda x, w, b: mx.sum(cot * mx.sin(fn(x, w, b))), argnums=(0, 1, 2))


@pytest.mark.parametrize("in_axes", [(0, None, None), (None, 0, 0), (0, 0, 0), (2, 1, None)])
@pytest.mark.parametrize("per_task", [False, True], ids=["single", "per_task"])
def test_gradient_under_vmap(per_task, in_axes):
    rng = np.random.default_rng(11)
    base = make_args(rng, VMAP_SHAPE[per_task], mx.float32, "task")
    cot = rand(rng, reference.linear(*base).shape)
    args = batched(rng, base, in_axes)
    got = mx.vmap(linear_gradient(ops.linear, cot), in_axes=in_axes)(*args)
    expected = mx.vmap(linear_gradient(reference.linear, cot), in_axes=in_axes)(*args)
    for name, g, e in zip(NAMES, got, expected, strict=True):
        assert_close(g, e, mx.float32, k=12, label=f"vmap of d{name}")


@pytest.mark.parametrize("per_task", [False, True], ids=["single", "per_task"])
def test_gradient_jvp(per_task):
    rng = np.random.default_rng(12)
    base = make_args(rng, VMAP_SHAPE[per_task], mx.float32, "task")
    cot = rand(rng, reference.linear(*base).shape)
    tangents = [rand(rng, a.shape) for a in base]
    _, got = mx.jvp(linear_gradient(ops.linear, cot), base, tangents)
    _, expected = mx.jvp(linear_gradient(reference.linear, cot), base, tangents)
    for name, g, e in zip(NAMES, got, expected, strict=True):
        assert_close(g, e, mx.float32, k=12, label=f"jvp of d{name}")


@pytest.mark.parametrize("bias_kind", BIAS_KINDS)
@pytest.mark.parametrize("per_task", [False, True], ids=["single", "per_task"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_jvp(dtype, per_task, bias_kind):
    rng = np.random.default_rng(5)
    lay = ("swapped", "contiguous", "strided")
    args, op_fn, ref_fn, names = present(make_args(rng, SMALL[per_task], dtype, bias_kind, lay))
    check_jvp(op_fn, ref_fn, args, names, rng, k=12)


VMAP_SHAPE = {False: LayerShape(False, 1, (2,), 3, 4), True: LayerShape(True, 2, (2,), 3, 4)}


def vmap_cases():
    for per_task in (False, True):
        shape = VMAP_SHAPE[per_task]
        for bias_kind in BIAS_KINDS if per_task else BIAS_KINDS[:2]:
            b = shape.bias(bias_kind)
            ndims = [len(shape.x), len(shape.weight), None if b is None else len(b)]
            for axes in in_axes_combos(ndims):
                mode = "per_task" if per_task else "single"
                yield pytest.param(
                    per_task, bias_kind, axes, id=f"{mode}-bias_{bias_kind}-{axes_id(axes)}"
                )


@pytest.mark.parametrize("per_task, bias_kind, in_axes", list(vmap_cases()))
def test_vmap_in_axes(per_task, bias_kind, in_axes):
    rng = np.random.default_rng(6)
    args = batched(rng, make_args(rng, VMAP_SHAPE[per_task], mx.float32, bias_kind), in_axes)
    args, op_fn, ref_fn, _ = present(args)
    check_vmap(op_fn, ref_fn, args, [a for a in in_axes[: len(args)]], k=3)


@pytest.mark.parametrize("per_task", [False, True], ids=["single", "per_task"])
def test_vmap_middle_axis(per_task):
    rng = np.random.default_rng(7)
    args = batched(rng, make_args(rng, VMAP_SHAPE[per_task], mx.bfloat16, "task"), (1, 1, 1))
    check_vmap(ops.linear, reference.linear, args, (1, 1, 1), k=3)


@pytest.mark.parametrize("per_task", [False, True], ids=["single", "per_task"])
def test_nested_vmap(per_task):
    rng = np.random.default_rng(8)
    base = make_args(rng, VMAP_SHAPE[per_task], mx.float32, "task")
    inner, outer = (0, None, 0), (len(base[0].shape), 0, None)
    args = batched(rng, batched(rng, base, inner), outer)
    got = mx.vmap(mx.vmap(ops.linear, in_axes=inner), in_axes=outer)(*args)
    from_ref = mx.vmap(mx.vmap(reference.linear, in_axes=inner), in_axes=outer)(*args)
    looped = loop_vmap(lambda *a: loop_vmap(ops.linear, a, inner), args, outer)
    assert_close(got, from_ref, mx.float32, label="nested vmap vs reference")
    assert_close(got, looped, mx.float32, label="nested vmap vs loop")


@pytest.mark.parametrize("bias_kind", BIAS_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_per_task_equals_vmap(dtype, bias_kind):
    """The task-batched primitive equals vmap of the single-weight one over tasks."""
    rng = np.random.default_rng(9)
    shape = LayerShape(True, 4, (3, 2), 5, 6)
    args, _, _, _ = present(make_args(rng, shape, dtype, bias_kind))
    axes = (0, 0, 0 if bias_kind == "task" else None)[: len(args)]
    via_vmap = mx.vmap(ops.linear, in_axes=axes)(*args)
    assert_close(ops.linear(*args), via_vmap, dtype, k=shape.d_in, label="per-task vs vmap")


@pytest.mark.parametrize("per_task", [False, True], ids=["single", "per_task"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_compile(dtype, per_task):
    rng = np.random.default_rng(10)
    args = make_args(rng, SMALL[per_task], dtype, "task")
    check_compile(lambda x, w, b: 2 * mx.tanh(ops.linear(x, w, b)) + 1, args, rng, k=12)


@pytest.mark.parametrize("bad", BAD_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("which", [0, 1, 2], ids=NAMES)
@pytest.mark.parametrize("per_task", [False, True], ids=["single", "per_task"])
def test_bad_dtype(per_task, which, bad):
    args = make_args(np.random.default_rng(11), SMALL[per_task], mx.float32, "task")
    args[which] = args[which].astype(bad)
    check_raises(TypeError, lambda: ops.linear(*args), [NAMES[which]])


BAD_SHAPES = [
    # (id, x, weight, bias, names in the message)
    ("weight_rank1", (2, 3), (3,), None, ["weight"]),
    ("weight_rank4", (1, 2, 3), (1, 1, 4, 3), None, ["weight"]),
    ("x_rank0", (), (4, 3), None, ["x"]),
    ("d_in", (2, 5), (4, 3), None, ["x", "weight"]),
    ("d_in_per_task", (2, 3, 5), (2, 4, 3), None, ["x", "weight"]),
    ("per_task_x_rank1", (3,), (2, 4, 3), None, ["x"]),
    ("T", (3, 2, 3), (2, 4, 3), None, ["x", "weight"]),
    ("bias_d_out", (2, 3), (4, 3), (5,), ["bias"]),
    ("bias_per_task_on_shared_weight", (2, 3), (4, 3), (2, 4), ["bias"]),
    ("bias_T", (2, 2, 3), (2, 4, 3), (3, 4), ["bias"]),
    ("bias_rank3", (2, 2, 3), (2, 4, 3), (2, 1, 4), ["bias"]),
    ("bias_scalar", (2, 3), (4, 3), (), ["bias"]),
]


@pytest.mark.parametrize(
    "x_shape, w_shape, b_shape, names", [pytest.param(*c[1:], id=c[0]) for c in BAD_SHAPES]
)
def test_bad_shapes(x_shape, w_shape, b_shape, names):
    rng = np.random.default_rng(12)
    x, w = rand(rng, x_shape), rand(rng, w_shape)
    b = None if b_shape is None else rand(rng, b_shape)
    shapes = [s for s in (x_shape, w_shape, b_shape) if s is not None]
    check_raises(ValueError, lambda: ops.linear(x, w, b), names, shapes)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs more than one core")
def test_large_products_keep_all_blas_threads_after_small_ones():
    """Small products run OpenBLAS on one thread; a large one that comes after them
    must get every thread back (a fresh process, so the small product comes first,
    on OpenBLAS even where MKL is installed)."""
    code = textwrap.dedent(
        """
        import mlx.core as mx, threadpoolctl
        from metapeft import ops
        def ours():
            (n,) = [i["num_threads"] for i in threadpoolctl.threadpool_info()
                    if "scipy_openblas32" in i["filepath"]]
            return n
        mx.eval(ops.linear(mx.ones((2, 2)), mx.ones((2, 2))))
        assert ours() == 1, ours()
        mx.eval(ops.linear(mx.ones((512, 512)), mx.ones((512, 512))))
        print(ours())
        """
    )
    env = {**os.environ, "METAPEFT_BLAS": "openblas"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert int(out.stdout.strip()) > 1, out.stdout + out.stderr
