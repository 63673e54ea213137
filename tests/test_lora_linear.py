"""ops.lora_linear: ``x @ weight.T + bias + scale * (x @ lora_a) @ lora_b``, with one
adapter or one adapter per task (the weight shared or per task)."""

import math

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
    np_matmul_rows,
    promote,
    rand,
    seeds,
    to_np,
    tol,
)
from metapeft import ops
from metapeft import reference as ref

NAMES = ("x", "weight", "lora_a", "lora_b", "bias")
SCALE = 0.75
# (per_task, weight shared by the tasks); a single adapter always has a shared weight.
MODES = {"single": (False, True), "per_task": (True, False), "per_task_shared_w": (True, True)}


def make_args(rng, shape, dtypes, bias_kind, shared_w=True, lay=("contiguous",) * 5):
    """[x, weight, lora_a, lora_b, bias-or-None]; ``dtypes`` is one dtype or one per input."""
    if not isinstance(dtypes, (list, tuple)):
        dtypes = (dtypes,) * 5
    w_shape = shape.weight[-2:] if shared_w else shape.weight
    b_shape = shape.bias(bias_kind)
    shapes = [shape.x, w_shape, shape.lora_a, shape.lora_b, b_shape]
    return [
        None if s is None else rand(rng, s, d, layout)
        for s, d, layout in zip(shapes, dtypes, lay, strict=True)
    ]


def present(args, scale=SCALE):
    """The inputs that are not None, with the op and reference over exactly those."""
    args = [a for a in args if a is not None]

    def op_fn(x, w, a, b, *bias):
        return ops.lora_linear(x, w, a, b, scale, *bias)

    def ref_fn(x, w, a, b, *bias):
        return ref.lora_linear(x, w, a, b, scale, *bias)

    return args, op_fn, ref_fn, NAMES


def base_layer(x, w, bias):
    """ops.linear as the base of a LoRA layer: a weight shared by per-task adapters
    goes to ops.linear broadcast over the tasks (its per-task bias needs a per-task weight)."""
    if bias is not None and bias.ndim == 2 and w.ndim == 2:
        w = mx.broadcast_to(w, (x.shape[0], *w.shape))
    return ops.linear(x, w, bias)


def np_lora(x, w, a, b, scale, bias=None):
    per_task = a.ndim == 3
    low = np_matmul_rows(np_matmul_rows(x, a, per_task), b, per_task)
    return np_linear(x, w, bias) + scale * low


def check_values(args, scale, k):
    x, w, a, b, bias = args
    present_ = [t for t in args if t is not None]
    out_dtype = promote(*(t.dtype for t in present_))
    rtol = tol(coarsest(*(t.dtype for t in present_)), k)
    out = ops.lora_linear(x, w, a, b, scale, bias)
    expected = np_lora(
        *(None if t is None else to_np(t) for t in (x, w, a, b)),
        scale,
        None if bias is None else to_np(bias),
    )
    assert_close(
        out, ref.lora_linear(x, w, a, b, scale, bias), out_dtype, rtol=rtol, label="vs reference"
    )
    assert_close(out, expected, out_dtype, rtol=rtol, label="vs numpy")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@given(
    shape=layer_shapes(),
    shared_w=st.booleans(),
    bias_kind=st.sampled_from([None, "shared", "task"]),
    scale=st.floats(-2.0, 2.0),
    lay=st.tuples(*[layouts] * 5),
    seed=seeds,
)
def test_values(dtype, shape, shared_w, bias_kind, scale, lay, seed):
    rng = np.random.default_rng(seed)
    args = make_args(rng, shape, dtype, bias_kind, shared_w or not shape.per_task, lay)
    check_values(args, scale, k=shape.d_in + shape.r)


def mixed_cases():
    for mode in MODES:
        for i, name in enumerate(NAMES):
            for other in (mx.float16, mx.bfloat16):
                dtypes = [mx.float32] * 5
                dtypes[i] = other
                yield pytest.param(mode, dtypes, id=f"{mode}-{name}_{dtype_name(other)}")
        yield pytest.param(
            mode, [mx.float16, mx.bfloat16] * 2 + [mx.float16], id=f"{mode}-float16_bfloat16"
        )


@pytest.mark.parametrize("mode, dtypes", list(mixed_cases()))
def test_mixed_dtypes_promote(mode, dtypes):
    per_task, shared_w = MODES[mode]
    shape = LayerShape(per_task, 2, (3,), 5, 4, r=3)
    args = make_args(np.random.default_rng(0), shape, dtypes, "task", shared_w)
    check_values(args, SCALE, k=8)


@pytest.mark.parametrize("which", [*NAMES, "all"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_noncontiguous(mode, layout, which):
    per_task, shared_w = MODES[mode]
    shape = LayerShape(per_task, 3, (4, 2), 6, 5, r=3)
    lay = tuple(layout if which in (n, "all") else "contiguous" for n in NAMES)
    for dtype in DTYPES:
        args = make_args(np.random.default_rng(1), shape, dtype, "task", shared_w, lay)
        check_values(args, SCALE, k=9)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_zero_adapter_is_the_base_layer(dtype, mode):
    """As in mlx-lm: a fresh adapter (lora_b = 0), or scale 0, gives the base linear layer."""
    per_task, shared_w = MODES[mode]
    rng = np.random.default_rng(2)
    x, w, a, b, bias = make_args(
        rng, LayerShape(per_task, 3, (4,), 6, 5, r=2), dtype, "task", shared_w
    )
    base = base_layer(x, w, bias)
    fresh = ops.lora_linear(x, w, a, mx.zeros_like(b), SCALE, bias)
    assert_close(fresh, base, dtype, label="lora_b = 0")
    assert_close(ops.lora_linear(x, w, a, b, 0.0, bias), base, dtype, label="scale = 0")
    perturbed = ops.lora_linear(x, w, a, b, SCALE, bias)
    assert not np.allclose(to_np(perturbed), to_np(base)), "a non-zero adapter changed nothing"


LARGE = [
    pytest.param("single", LayerShape(False, 1, (4, 96), 1024, 384, r=16), id="single"),
    pytest.param("per_task", LayerShape(True, 8, (64,), 512, 256, r=16), id="per_task"),
    pytest.param(
        "per_task_shared_w", LayerShape(True, 8, (64,), 512, 256, r=8), id="per_task_shared_w"
    ),
    # Per-task low-rank products big enough in all to be shared among worker threads.
    pytest.param(
        "per_task_shared_w", LayerShape(True, 16, (64,), 512, 512, r=16), id="shared_w-T16"
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=dtype_name)
@pytest.mark.parametrize("mode, shape", LARGE)
def test_large_shapes(mode, shape, dtype, layout):
    """Sizes where BLAS blocks and threads, values and gradients."""
    _, shared_w = MODES[mode]
    rng = np.random.default_rng(16)
    args = make_args(rng, shape, dtype, "task", shared_w, (layout,) * 5)
    check_values(args, SCALE, k=shape.d_in + shape.r)
    args, op_fn, ref_fn, names = present(args)
    check_grads(op_fn, ref_fn, args, names, rng, k=shape.rows * shape.T)


EMPTY = [
    pytest.param("per_task", LayerShape(True, 0, (3,), 4, 5, r=2), id="T=0"),
    pytest.param("per_task_shared_w", LayerShape(True, 0, (3,), 4, 5, r=2), id="T=0-shared_w"),
    pytest.param("single", LayerShape(False, 1, (0,), 4, 5, r=2), id="N=0"),
    pytest.param("per_task", LayerShape(True, 2, (0,), 4, 5, r=2), id="N=0-per_task"),
    pytest.param("single", LayerShape(False, 1, (3,), 0, 5, r=2), id="d_in=0"),
    pytest.param("per_task", LayerShape(True, 2, (3,), 0, 5, r=2), id="d_in=0-per_task"),
    pytest.param("single", LayerShape(False, 1, (3,), 4, 5, r=0), id="r=0"),
    pytest.param("per_task", LayerShape(True, 2, (3,), 4, 5, r=0), id="r=0-per_task"),
    pytest.param("per_task_shared_w", LayerShape(True, 2, (3,), 4, 5, r=0), id="r=0-shared_w"),
    pytest.param("single", LayerShape(False, 1, (3,), 4, 0, r=2), id="d_out=0"),
]


@pytest.mark.parametrize("bias_kind", [None, "task"])
@pytest.mark.parametrize("mode, shape", EMPTY)
def test_empty_dims(mode, shape, bias_kind):
    _, shared_w = MODES[mode]
    rng = np.random.default_rng(3)
    for dtype in DTYPES:
        args = make_args(rng, shape, dtype, bias_kind, shared_w)
        check_values(args, SCALE, k=1)
        if shape.r == 0:
            x, w, a, b, bias = args
            assert_close(
                ops.lora_linear(*args[:4], SCALE, bias),
                base_layer(x, w, bias),
                dtype,
                label="r=0 gives the base layer",
            )
    args, op_fn, ref_fn, names = present(make_args(rng, shape, mx.float32, bias_kind, shared_w))
    check_grads(op_fn, ref_fn, args, names, rng)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@given(
    shape=layer_shapes(),
    shared_w=st.booleans(),
    bias_kind=st.sampled_from([None, "shared", "task"]),
    scale=st.floats(-2.0, 2.0),
    seed=seeds,
)
def test_grads_match_reference(dtype, shape, shared_w, bias_kind, scale, seed):
    rng = np.random.default_rng(seed)
    args = make_args(rng, shape, dtype, bias_kind, shared_w or not shape.per_task)
    args, op_fn, ref_fn, names = present(args, scale)
    k = max(shape.d_in, shape.d_out, shape.rows * shape.T) + shape.r
    check_grads(op_fn, ref_fn, args, names, rng, k=k)


SMALL = LayerShape(False, 1, (3,), 4, 3, r=2), LayerShape(True, 2, (2,), 3, 3, r=2)


@pytest.mark.parametrize("bias_kind", [None, "task"])
@pytest.mark.parametrize("mode", MODES)
def test_grads_finite_differences(mode, bias_kind):
    per_task, shared_w = MODES[mode]
    rng = np.random.default_rng(4)
    lay = ("swapped", "strided", "transposed", "reversed", "broadcast")
    args = make_args(rng, SMALL[per_task], mx.float32, bias_kind, shared_w, lay)
    args, op_fn, _, names = present(args)
    check_grads_fd(op_fn, args, names, rng)


@pytest.mark.parametrize("inner", [0, 2, 3], ids=lambda i: f"d{NAMES[i]}")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=dtype_name)
def test_second_order(dtype, mode, inner):
    """e.g. the gradient with respect to lora_a of a function of the gradient in x."""
    per_task, shared_w = MODES[mode]
    rng = np.random.default_rng(5)
    args, op_fn, ref_fn, names = present(make_args(rng, SMALL[per_task], dtype, "task", shared_w))
    check_second_order(op_fn, ref_fn, args, names, inner, rng, k=12)


@pytest.mark.parametrize("bias_kind", [None, "task"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_jvp(dtype, mode, bias_kind):
    per_task, shared_w = MODES[mode]
    rng = np.random.default_rng(6)
    lay = ("swapped", "contiguous", "strided", "transposed", "broadcast")
    args = make_args(rng, SMALL[per_task], dtype, bias_kind, shared_w, lay)
    args, op_fn, ref_fn, names = present(args)
    check_jvp(op_fn, ref_fn, args, names, rng, k=12)


VMAP_SHAPE = {
    False: LayerShape(False, 1, (2,), 3, 4, r=2),
    True: LayerShape(True, 2, (2,), 3, 4, r=2),
}
VMAP_MODES = [
    ("single", "shared"),
    ("single", None),
    ("per_task", "task"),
    ("per_task_shared_w", "shared"),
]


def vmap_cases():
    for mode, bias_kind in VMAP_MODES:
        per_task, shared_w = MODES[mode]
        shapes = make_args(
            np.random.default_rng(0), VMAP_SHAPE[per_task], mx.float32, bias_kind, shared_w
        )
        for axes in in_axes_combos([None if a is None else a.ndim for a in shapes]):
            yield pytest.param(mode, bias_kind, axes, id=f"{mode}-bias_{bias_kind}-{axes_id(axes)}")


@pytest.mark.parametrize("mode, bias_kind, in_axes", list(vmap_cases()))
def test_vmap_in_axes(mode, bias_kind, in_axes):
    per_task, shared_w = MODES[mode]
    rng = np.random.default_rng(7)
    args = batched(
        rng, make_args(rng, VMAP_SHAPE[per_task], mx.float32, bias_kind, shared_w), in_axes
    )
    args, op_fn, ref_fn, _ = present(args)
    check_vmap(op_fn, ref_fn, args, in_axes[: len(args)], k=5)


@pytest.mark.parametrize("mode", MODES)
def test_vmap_middle_axis(mode):
    per_task, shared_w = MODES[mode]
    rng = np.random.default_rng(8)
    args = batched(
        rng, make_args(rng, VMAP_SHAPE[per_task], mx.float16, "task", shared_w), (1,) * 5
    )
    args, op_fn, ref_fn, _ = present(args)
    check_vmap(op_fn, ref_fn, args, (1,) * 5, k=5)


@pytest.mark.parametrize("mode", MODES)
def test_nested_vmap(mode):
    per_task, shared_w = MODES[mode]
    rng = np.random.default_rng(9)
    base = make_args(rng, VMAP_SHAPE[per_task], mx.float32, "task", shared_w)
    inner, outer = (0, None, 0, 0, None), (base[0].ndim, 0, None, 1, 0)
    args, op_fn, ref_fn, _ = present(batched(rng, batched(rng, base, inner), outer))
    got = mx.vmap(mx.vmap(op_fn, in_axes=inner), in_axes=outer)(*args)
    from_ref = mx.vmap(mx.vmap(ref_fn, in_axes=inner), in_axes=outer)(*args)
    looped = loop_vmap(lambda *a: loop_vmap(op_fn, a, inner), args, outer)
    assert_close(got, from_ref, mx.float32, label="nested vmap vs reference")
    assert_close(got, looped, mx.float32, label="nested vmap vs loop")


@pytest.mark.parametrize("shared_w", [True, False], ids=["shared_w", "per_task_w"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_per_task_equals_vmap(dtype, shared_w):
    """One adapter per task equals vmap of the single-adapter layer over tasks."""
    rng = np.random.default_rng(10)
    shape = LayerShape(True, 4, (3, 2), 6, 5, r=3)
    args, op_fn, _, _ = present(make_args(rng, shape, dtype, "task", shared_w))
    via_vmap = mx.vmap(op_fn, in_axes=(0, None if shared_w else 0, 0, 0, 0))(*args)
    assert_close(op_fn(*args), via_vmap, dtype, k=9, label="per-task vs vmap")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_compile(dtype, mode):
    per_task, shared_w = MODES[mode]
    rng = np.random.default_rng(11)
    args, op_fn, _, _ = present(make_args(rng, SMALL[per_task], dtype, "task", shared_w))
    check_compile(lambda *a: mx.tanh(op_fn(*a)) * 2 - 1, args, rng, k=12)


def test_compile_keeps_scales_apart():
    """Two calls that differ only in scale are different primitives (is_equivalent)."""
    rng = np.random.default_rng(12)
    x, w, a, b, bias = make_args(rng, SMALL[0], mx.float32, "shared")

    def two_scales(x, w, a, b, bias):
        return (ops.lora_linear(x, w, a, b, 0.5, bias), ops.lora_linear(x, w, a, b, 2.0, bias))

    got = mx.compile(two_scales)(x, w, a, b, bias)
    for out, scale in zip(got, (0.5, 2.0), strict=True):
        assert_close(
            out,
            ref.lora_linear(x, w, a, b, scale, bias),
            mx.float32,
            label=f"compiled, scale={scale}",
        )


@pytest.mark.parametrize("bad", BAD_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("which", range(5), ids=NAMES)
@pytest.mark.parametrize("mode", MODES)
def test_bad_dtype(mode, which, bad):
    per_task, shared_w = MODES[mode]
    args = make_args(np.random.default_rng(13), SMALL[per_task], mx.float32, "task", shared_w)
    args[which] = args[which].astype(bad)
    x, w, a, b, bias = args
    check_raises(TypeError, lambda: ops.lora_linear(x, w, a, b, SCALE, bias), [NAMES[which]])


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf])
def test_non_finite_scale(scale):
    x, w, a, b, bias = make_args(np.random.default_rng(14), SMALL[0], mx.float32, "shared")
    check_raises(ValueError, lambda: ops.lora_linear(x, w, a, b, scale, bias), ["scale"])


# Valid shapes: single x (2, 3), weight (4, 3), lora_a (3, 2), lora_b (2, 4), bias (4,);
# per task T=2: x (2, 5, 3), weight (4, 3) or (2, 4, 3), lora_a (2, 3, 2), lora_b (2, 2, 4).
BAD_SHAPES = [
    # (id, x, weight, lora_a, lora_b, bias, names in the message)
    ("x_d_in", (2, 5), (4, 3), (3, 2), (2, 4), None, ["x"]),
    ("x_rank0", (), (4, 3), (3, 2), (2, 4), None, ["x"]),
    ("weight_rank1", (2, 3), (3,), (3, 2), (2, 4), None, ["weight"]),
    ("lora_a_d_in", (2, 3), (4, 3), (5, 2), (2, 4), None, ["lora_a"]),
    ("lora_a_rank1", (2, 3), (4, 3), (3,), (2, 4), None, ["lora_a"]),
    ("rank_mismatch", (2, 3), (4, 3), (3, 2), (3, 4), None, ["lora_a", "lora_b"]),
    ("lora_b_d_out", (2, 3), (4, 3), (3, 2), (2, 5), None, ["lora_b", "weight"]),
    ("adapter_ranks_differ", (2, 5, 3), (4, 3), (2, 3, 2), (2, 4), None, ["lora_a", "lora_b"]),
    ("bias_d_out", (2, 3), (4, 3), (3, 2), (2, 4), (5,), ["bias"]),
    ("bias_per_task_single", (2, 3), (4, 3), (3, 2), (2, 4), (2, 4), ["bias"]),
    ("per_task_x_rank1", (3,), (4, 3), (2, 3, 2), (2, 2, 4), None, ["x"]),
    ("per_task_x_d_in", (2, 5, 4), (4, 3), (2, 3, 2), (2, 2, 4), None, ["x"]),
    ("T_adapters", (2, 5, 3), (4, 3), (2, 3, 2), (3, 2, 4), None, ["lora_a", "lora_b"]),
    ("T_x", (3, 5, 3), (4, 3), (2, 3, 2), (2, 2, 4), None, ["x"]),
    ("T_weight", (2, 5, 3), (3, 4, 3), (2, 3, 2), (2, 2, 4), None, ["weight"]),
    ("per_task_rank_mismatch", (2, 5, 3), (4, 3), (2, 3, 2), (2, 3, 4), None, ["lora_a", "lora_b"]),
    (
        "per_task_lora_b_d_out",
        (2, 5, 3),
        (2, 4, 3),
        (2, 3, 2),
        (2, 2, 6),
        None,
        ["lora_b", "weight"],
    ),
    ("per_task_bias_T", (2, 5, 3), (4, 3), (2, 3, 2), (2, 2, 4), (3, 4), ["bias"]),
    ("per_task_bias_d_out", (2, 5, 3), (4, 3), (2, 3, 2), (2, 2, 4), (2, 6), ["bias"]),
]


@pytest.mark.parametrize(
    "x_s, w_s, a_s, b_s, bias_s, names", [pytest.param(*c[1:], id=c[0]) for c in BAD_SHAPES]
)
def test_bad_shapes(x_s, w_s, a_s, b_s, bias_s, names):
    rng = np.random.default_rng(15)
    x, w, a, b = (rand(rng, s) for s in (x_s, w_s, a_s, b_s))
    bias = None if bias_s is None else rand(rng, bias_s)
    shapes = [s for s in (x_s, w_s, a_s, b_s, bias_s) if s is not None]
    check_raises(ValueError, lambda: ops.lora_linear(x, w, a, b, SCALE, bias), names, shapes)
