"""ops.task_sgd: ``params - lr * grads`` over a parameter tree with a leading task axis."""

import itertools
import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mlx.utils import tree_map

from conftest import (
    BAD_DTYPES,
    DTYPES,
    LAYOUTS,
    MANY_LEAVES,
    assert_close,
    assert_tree_close,
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
    fd_grad,
    in_axes_combos,
    layouts,
    loop_vmap,
    nest,
    promote,
    rand,
    seeds,
    to_np,
    tol,
    tree_shapes,
)
from metapeft import ops
from metapeft import reference as ref

# How lr is given: a float; one array for every leaf ("array", a scalar); or a tree like
# params whose leaves are the full shape, the shape without the task axis (shared by the
# tasks, as in Meta-SGD), one rate per task (T, 1, ...), or a scalar.
LR_KINDS = ["float", "array", "full", "shared", "per_task", "scalar"]
LR_FLOAT = 0.3


def lr_shape(kind, t, s):
    return {"full": (t, *s), "shared": s, "per_task": (t,) + (1,) * len(s), "scalar": ()}[kind]


class Case:
    """A task_sgd call over flat leaves: params, grads and the lr arrays (if any)."""

    def __init__(self, params, grads, lr_kind, lrs):
        self.n, self.lr_kind = len(params), lr_kind
        self.args = [*params, *grads, *lrs]
        self.names = (
            [f"params[{i}]" for i in range(self.n)]
            + [f"grads[{i}]" for i in range(self.n)]
            + [f"lr[{i}]" for i in range(len(lrs))]
        )

    def lr(self, args):
        if self.lr_kind == "float":
            return LR_FLOAT
        if self.lr_kind == "array":
            return args[2 * self.n]
        return nest(args[2 * self.n :])

    def call(self, fn):
        """``fn`` (ops.task_sgd or the reference) as a function of the flat arrays."""
        n = self.n
        return lambda *a: fn(nest(a[:n]), nest(a[n : 2 * n]), self.lr(a))

    @property
    def op(self):
        return self.call(ops.task_sgd)

    @property
    def ref(self):
        return self.call(ref.task_sgd)

    def out_dtypes(self):
        return [
            promote(p.dtype, g.dtype)
            for p, g in zip(self.args[: self.n], self.args[self.n : 2 * self.n], strict=True)
        ]

    def numpy(self):
        """float64 ``params - lr * grads``, as a tree."""
        a = [to_np(v) for v in self.args]
        n = self.n
        if self.lr_kind == "float":
            lrs = [LR_FLOAT] * n
        elif self.lr_kind == "array":
            lrs = [a[2 * n]] * n
        else:
            lrs = a[2 * n :]
        return nest([p - lr * g for p, g, lr in zip(a[:n], a[n : 2 * n], lrs, strict=True)])


def make_case(rng, t, shapes, dtypes, lr_kind, lay=("contiguous",) * 3):
    """``dtypes``: one dtype, or (params, grads, lr) dtypes; ``lay``: their layouts."""
    if not isinstance(dtypes, (list, tuple)):
        dtypes = (dtypes,) * 3
    params = [rand(rng, (t, *s), dtypes[0], lay[0]) for s in shapes]
    grads = [rand(rng, (t, *s), dtypes[1], lay[1]) for s in shapes]
    if lr_kind == "float":
        lrs = []
    elif lr_kind == "array":
        lrs = [rand(rng, (), dtypes[2])]
    else:
        lrs = [rand(rng, lr_shape(lr_kind, t, s), dtypes[2], lay[2]) for s in shapes]
    return Case(params, grads, lr_kind, lrs)


def check_values(case):
    dtypes = case.out_dtypes()
    rtol = tol(coarsest(*(a.dtype for a in case.args)))
    out = case.op(*case.args)
    assert_tree_close(out, case.ref(*case.args), dtypes, rtol=rtol, label="vs reference")
    assert_tree_close(out, case.numpy(), dtypes, rtol=rtol, label="vs numpy")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@given(
    tree=tree_shapes(),
    lr_kind=st.sampled_from(LR_KINDS),
    lay=st.tuples(layouts, layouts, layouts),
    seed=seeds,
)
def test_values(dtype, tree, lr_kind, lay, seed):
    t, shapes = tree
    check_values(make_case(np.random.default_rng(seed), t, shapes, dtype, lr_kind, lay))


@pytest.mark.parametrize("lr_kind", ["float", "full", "shared"])
@pytest.mark.parametrize(
    "dtypes",
    list(itertools.product(DTYPES, repeat=3)),
    ids=lambda ds: "-".join(map(dtype_name, ds)),
)
def test_mixed_dtypes_promote(dtypes, lr_kind):
    """The result keeps promote(param, grad); lr's dtype does not change it."""
    case = make_case(np.random.default_rng(0), 3, [(4, 2), (5,)], dtypes, lr_kind)
    check_values(case)


@pytest.mark.parametrize("which", ["params", "grads", "lr", "all"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("lr_kind", ["full", "shared", "per_task"])
def test_noncontiguous(lr_kind, layout, which):
    lay = tuple(layout if which in (n, "all") else "contiguous" for n in ("params", "grads", "lr"))
    for dtype in DTYPES:
        rng = np.random.default_rng(1)
        check_values(make_case(rng, 3, [(4, 5), (2, 3, 2), (6,)], dtype, lr_kind, lay))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("lr_kind", ["full", "shared", "per_task"])
def test_size_one_axes(lr_kind, layout):
    """Axes of size 1 between others: the kernel reads a shared lr in place past them."""
    rng = np.random.default_rng(4)
    shapes = [(3, 1, 4), (1, 5), (2, 1, 1, 3), (4, 1)]
    check_values(make_case(rng, 3, shapes, mx.float32, lr_kind, ("contiguous",) * 2 + (layout,)))


def test_tree_structure_is_kept():
    """dicts, lists, tuples and nesting come back as they went in."""
    rng = np.random.default_rng(2)

    def r(*s):
        return rand(rng, (2, *s))

    params = {"layers": [{"w": r(3, 2), "b": r(3)}, (r(4), r(1, 1))], "head": r(5)}
    grads = tree_map(lambda p: rand(rng, p.shape), params)
    lr = tree_map(lambda p: rand(rng, p.shape[1:]), params)
    for step in (0.1, lr):
        out = ops.task_sgd(params, grads, step)
        assert isinstance(out, dict) and list(out) == ["layers", "head"], f"got {out!r}"
        assert isinstance(out["layers"], list) and isinstance(out["layers"][0], dict), (
            f"layers: expected [dict, tuple], got {out['layers']!r}"
        )
        assert isinstance(out["layers"][1], tuple), (
            f"layers[1]: expected a tuple, got {type(out['layers'][1]).__name__}"
        )
        assert_tree_close(out, ref.task_sgd(params, grads, step), mx.float32)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "broadcast"])
@pytest.mark.parametrize("lr_kind", ["float", "full", "shared"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_large_trees(dtype, lr_kind, layout):
    """Leaves large enough for vectorized and threaded kernels, and many small ones."""
    rng = np.random.default_rng(17)
    shapes = [(256, 512), (1000,), (3, 7, 129)] + [(5,)] * 40
    check_values(make_case(rng, 6, shapes, dtype, lr_kind, (layout,) * 3))


@pytest.mark.parametrize("lr_kind", ["float", "array", "shared"])
def test_many_leaves(lr_kind):
    """A tree split over several primitives: values, gradients, vmap and compile."""
    rng = np.random.default_rng(18)
    case = make_case(rng, 2, MANY_LEAVES, mx.float32, lr_kind)
    check_values(case)
    check_grads(case.op, case.ref, case.args, case.names, rng)
    in_axes = (0,) * len(case.args)
    check_vmap(case.op, case.ref, batched(rng, case.args, in_axes), in_axes)
    check_compile(case.op, case.args, rng)


EMPTY = [
    pytest.param(0, [(3,), (2, 2)], id="T=0"),
    pytest.param(2, [(0,), (3,)], id="empty_leaf"),
    pytest.param(2, [(3, 0, 2)], id="empty_inner_axis"),
    pytest.param(0, [()], id="T=0-scalar_params"),
]


@pytest.mark.parametrize("lr_kind", LR_KINDS)
@pytest.mark.parametrize("t, shapes", EMPTY)
def test_empty_dims(t, shapes, lr_kind):
    rng = np.random.default_rng(3)
    for dtype in DTYPES:
        check_values(make_case(rng, t, shapes, dtype, lr_kind))
    case = make_case(rng, t, shapes, mx.float32, lr_kind)
    check_grads(case.op, case.ref, case.args, case.names, rng)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@given(tree=tree_shapes(), lr_kind=st.sampled_from(LR_KINDS), seed=seeds)
def test_grads_match_reference(dtype, tree, lr_kind, seed):
    t, shapes = tree
    rng = np.random.default_rng(seed)
    case = make_case(rng, t, shapes, dtype, lr_kind)
    check_grads(case.op, case.ref, case.args, case.names, rng, k=t * 60)


@pytest.mark.parametrize("lr_kind", LR_KINDS)
def test_grads_finite_differences(lr_kind):
    rng = np.random.default_rng(4)
    case = make_case(
        rng, 2, [(3,), (2, 2)], mx.float32, lr_kind, ("strided", "transposed", "broadcast")
    )
    check_grads_fd(case.op, case.args, case.names, rng)


@pytest.mark.parametrize("inner", [0, 2, 4], ids=["dparams", "dgrads", "dlr"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16], ids=dtype_name)
def test_second_order(dtype, inner):
    rng = np.random.default_rng(5)
    case = make_case(rng, 3, [(4,), (2, 3)], dtype, "shared")
    check_second_order(case.op, case.ref, case.args, case.names, inner, rng, k=8)


def maml_meta_loss(sgd, lr_kind, rng):
    """Two inner task_sgd steps from meta-parameters (w, b) broadcast to T tasks, each on
    gradients from mx.grad of a support loss, then the query loss: second-order MAML
    (Meta-SGD with a per-parameter lr tree). Returns (loss(w, b, *lrs), args, names)."""
    t, n, d_in, d_out = 3, 5, 4, 2
    xs, ys = rand(rng, (t, n, d_in)), rand(rng, (t, n, d_out))
    xq, yq = rand(rng, (t, n, d_in)), rand(rng, (t, n, d_out))

    def model(p, x):
        return mx.tanh(x @ mx.swapaxes(p["w"], -1, -2) + p["b"][:, None, :])

    def support_loss(p):
        return mx.sum(mx.square(model(p, xs) - ys))

    def loss(w, b, *lrs):
        lr = {"w": lrs[0], "b": lrs[1]} if lrs else 0.4
        p = {"w": mx.broadcast_to(w, (t, *w.shape)), "b": mx.broadcast_to(b, (t, *b.shape))}
        for _ in range(2):
            p = sgd(p, mx.grad(support_loss)(p), lr)
        return mx.sum(mx.square(model(p, xq) - yq))

    args = [rand(rng, (d_out, d_in)), rand(rng, (d_out,))]
    if lr_kind == "shared":
        args += [
            mx.array(rng.uniform(0.2, 0.5, s).astype(np.float32)) for s in [(d_out, d_in), (d_out,)]
        ]
    return loss, args, ["w", "b", "lr[w]", "lr[b]"][: len(args)]


@pytest.mark.parametrize("lr_kind", ["float", "shared"], ids=["maml", "meta_sgd"])
def test_maml_second_order(lr_kind):
    """The meta-gradient through two chained task_sgd steps, whose grads come from
    mx.grad, matches the reference and finite differences."""
    op_loss, args, names = maml_meta_loss(ops.task_sgd, lr_kind, np.random.default_rng(6))
    ref_loss, _, _ = maml_meta_loss(ref.task_sgd, lr_kind, np.random.default_rng(6))
    argnums = tuple(range(len(args)))
    value, got = mx.value_and_grad(op_loss, argnums=argnums)(*args)
    ref_value, expected = mx.value_and_grad(ref_loss, argnums=argnums)(*args)
    assert_close(value, ref_value, mx.float32, label="meta loss")
    for name, arg, g, e in zip(names, args, got, expected, strict=True):
        assert_close(g, e, mx.float32, label=f"meta-grad[{name}] vs reference")
        fd = fd_grad(op_loss, args, names.index(name), mx.array(1.0), eps=1e-2)
        assert_close(g, fd, arg.dtype, rtol=5e-3, label=f"meta-grad[{name}] vs finite differences")


@pytest.mark.parametrize("lr_kind", LR_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_jvp(dtype, lr_kind):
    rng = np.random.default_rng(7)
    case = make_case(rng, 2, [(3,), (2, 2)], dtype, lr_kind, ("swapped", "strided", "reversed"))
    check_jvp(case.op, case.ref, case.args, case.names, rng)


VMAP_T, VMAP_SHAPE = 2, (3,)


def vmap_cases():
    for lr_kind in ["float", "full", "shared", "per_task", "scalar"]:
        case = make_case(np.random.default_rng(0), VMAP_T, [VMAP_SHAPE], mx.float32, lr_kind)
        for axes in in_axes_combos([a.ndim for a in case.args]):
            yield pytest.param(lr_kind, axes, id=f"lr_{lr_kind}-{axes_id(axes)}")


@pytest.mark.parametrize("lr_kind, in_axes", list(vmap_cases()))
def test_vmap_in_axes(lr_kind, in_axes):
    rng = np.random.default_rng(8)
    case = make_case(rng, VMAP_T, [VMAP_SHAPE], mx.float32, lr_kind)
    check_vmap(case.op, case.ref, batched(rng, case.args, in_axes), in_axes)


def multi_leaf_axes():
    """A fixed sample of in_axes over a three-leaf tree (all combinations are too many)."""
    case = make_case(np.random.default_rng(0), VMAP_T, [(3,), (2, 2), ()], mx.float32, "full")
    combos = in_axes_combos([a.ndim for a in case.args])
    picks = np.random.default_rng(0).choice(len(combos), size=12, replace=False)
    return [combos[i] for i in sorted(picks)]


@pytest.mark.parametrize("in_axes", multi_leaf_axes(), ids=axes_id)
def test_vmap_multi_leaf(in_axes):
    rng = np.random.default_rng(9)
    case = make_case(rng, VMAP_T, [(3,), (2, 2), ()], mx.bfloat16, "full")
    check_vmap(case.op, case.ref, batched(rng, case.args, in_axes), in_axes)


def test_nested_vmap():
    rng = np.random.default_rng(10)
    case = make_case(rng, VMAP_T, [(3,), (2, 2)], mx.float32, "shared")
    inner = (0, None, 1, 0, None, 0)
    outer = (2, 0, None, None, 1, 0)
    args = batched(rng, batched(rng, case.args, inner), outer)
    got = mx.vmap(mx.vmap(case.op, in_axes=inner), in_axes=outer)(*args)
    from_ref = mx.vmap(mx.vmap(case.ref, in_axes=inner), in_axes=outer)(*args)
    looped = loop_vmap(lambda *a: loop_vmap(case.op, a, inner), args, outer)
    assert_tree_close(got, from_ref, mx.float32, label="nested vmap vs reference")
    assert_tree_close(got, looped, mx.float32, label="nested vmap vs loop")


@pytest.mark.parametrize("lr_kind", LR_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_compile(dtype, lr_kind):
    rng = np.random.default_rng(11)
    case = make_case(rng, 2, [(3,), (2, 2)], dtype, lr_kind)
    step = case.op
    check_compile(lambda *a: tree_map(lambda v: mx.sin(v) * 2, step(*a)), case.args, rng)


@pytest.mark.parametrize("bad", BAD_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("which", ["params", "grads", "lr"])
def test_bad_dtype(which, bad):
    case = make_case(np.random.default_rng(12), 2, [(3,), (2, 2)], mx.float32, "full")
    i = {"params": 0, "grads": 2, "lr": 4}[which] + 1  # the second leaf of each
    args = list(case.args)
    args[i] = args[i].astype(bad)
    check_raises(TypeError, lambda: case.op(*args), [which])


def test_bad_dtype_single_lr_array():
    case = make_case(np.random.default_rng(12), 2, [(3,)], mx.float32, "array")
    args = [*case.args[:2], case.args[2].astype(mx.int32)]
    check_raises(TypeError, lambda: case.op(*args), ["lr"])


def trees(rng):
    p = {"w": rand(rng, (2, 3)), "b": [rand(rng, (2, 4))]}
    return p, tree_map(lambda v: rand(rng, v.shape), p)


@pytest.mark.parametrize("kind", ["missing_key", "extra_key", "list_length", "dict_vs_list"])
@pytest.mark.parametrize("which", ["grads", "lr"])
def test_mismatched_trees(which, kind):
    rng = np.random.default_rng(13)
    p, g = trees(rng)
    other = tree_map(lambda v: rand(rng, v.shape), p)
    if kind == "missing_key":
        del other["b"]
    elif kind == "extra_key":
        other["c"] = rand(rng, (2, 3))
    elif kind == "list_length":
        other["b"].append(rand(rng, (2, 4)))
    else:
        other["b"] = {"0": other["b"][0]}
    args = (p, other, 0.1) if which == "grads" else (p, g, other)
    check_raises(ValueError, lambda: ops.task_sgd(*args), [which])


BAD_SHAPES = [
    # (id, param shape, grad shape, lr shape, names in the message)
    ("grads_shape", (2, 3), (2, 4), None, ["grads"]),
    ("grads_task_axis", (2, 3), (3, 3), None, ["grads"]),
    ("grads_rank", (2, 3), (2, 3, 1), None, ["grads"]),
    ("lr_not_broadcastable", (2, 3), (2, 3), (4,), ["lr"]),
    ("lr_task_axis", (2, 3), (2, 3), (3, 3), ["lr"]),
    ("lr_grows_the_param", (2, 3), (2, 3), (5, 2, 3), ["lr"]),
    ("lr_grows_a_size_1_axis", (2, 1), (2, 1), (2, 4), ["lr"]),
]


@pytest.mark.parametrize(
    "p_s, g_s, lr_s, names", [pytest.param(*c[1:], id=c[0]) for c in BAD_SHAPES]
)
def test_bad_shapes(p_s, g_s, lr_s, names):
    rng = np.random.default_rng(14)
    p, g = {"w": rand(rng, p_s)}, {"w": rand(rng, g_s)}
    lr = 0.1 if lr_s is None else {"w": rand(rng, lr_s)}
    shapes = [s for s in (p_s, g_s, lr_s) if s is not None]
    check_raises(ValueError, lambda: ops.task_sgd(p, g, lr), names, shapes)


@pytest.mark.parametrize("lr", [math.nan, math.inf, -math.inf, 1e39])
def test_non_finite_lr(lr):
    p, g = trees(np.random.default_rng(15))
    check_raises(ValueError, lambda: ops.task_sgd(p, g, lr), ["lr"])
