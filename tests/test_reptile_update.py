"""ops.reptile_update: ``params + epsilon * (mean over tasks of adapted - params)``."""

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

EPS_FLOAT = 0.3
EPS_KINDS = ["float", "array"]  # a Python float, or a scalar mx.array (differentiable)


class Case:
    """A reptile_update call over flat leaves: params, adapted, then epsilon (if an array)."""

    def __init__(self, params, adapted, epsilon):
        self.n = len(params)
        self.eps_array = isinstance(epsilon, mx.array)
        self.args = [*params, *adapted] + ([epsilon] if self.eps_array else [])
        self.names = (
            [f"params[{i}]" for i in range(self.n)]
            + [f"adapted[{i}]" for i in range(self.n)]
            + (["epsilon"] if self.eps_array else [])
        )

    def call(self, fn):
        n = self.n
        return lambda *a: fn(
            nest(a[:n]), nest(a[n : 2 * n]), a[2 * n] if self.eps_array else EPS_FLOAT
        )

    @property
    def op(self):
        return self.call(ops.reptile_update)

    @property
    def ref(self):
        return self.call(ref.reptile_update)

    def out_dtypes(self):
        return [
            promote(p.dtype, a.dtype)
            for p, a in zip(self.args[: self.n], self.args[self.n : 2 * self.n], strict=True)
        ]

    def numpy(self):
        """float64 ``params + epsilon * (mean_T(adapted) - params)``; NaN where T = 0."""
        v = [to_np(a) for a in self.args]
        n = self.n
        eps = v[2 * n] if self.eps_array else EPS_FLOAT
        with np.errstate(invalid="ignore"):
            means = [
                a.sum(axis=0) / a.shape[0] if a.shape[0] else np.full(a.shape[1:], np.nan)
                for a in v[n : 2 * n]
            ]
        return nest([p + eps * (m - p) for p, m in zip(v[:n], means, strict=True)])


def make_case(rng, t, shapes, dtypes, eps_kind, lay=("contiguous",) * 2):
    """``dtypes``: one dtype, or (params, adapted, epsilon) dtypes."""
    if not isinstance(dtypes, (list, tuple)):
        dtypes = (dtypes,) * 3
    params = [rand(rng, s, dtypes[0], lay[0]) for s in shapes]
    adapted = [rand(rng, (t, *s), dtypes[1], lay[1]) for s in shapes]
    eps = EPS_FLOAT if eps_kind == "float" else rand(rng, (), dtypes[2])
    return Case(params, adapted, eps)


def check_values(case, t):
    dtypes = case.out_dtypes()
    rtol = tol(coarsest(*(a.dtype for a in case.args)), k=t)
    out = case.op(*case.args)
    assert_tree_close(out, case.ref(*case.args), dtypes, rtol=rtol, label="vs reference")
    assert_tree_close(out, case.numpy(), dtypes, rtol=rtol, label="vs numpy")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@given(
    tree=tree_shapes(),
    eps_kind=st.sampled_from(EPS_KINDS),
    lay=st.tuples(layouts, layouts),
    seed=seeds,
)
def test_values(dtype, tree, eps_kind, lay, seed):
    t, shapes = tree
    check_values(make_case(np.random.default_rng(seed), t, shapes, dtype, eps_kind, lay), t)


@pytest.mark.parametrize(
    "dtypes",
    list(itertools.product(DTYPES, repeat=3)),
    ids=lambda ds: "-".join(map(dtype_name, ds)),
)
def test_mixed_dtypes_promote(dtypes):
    """The result has promote(param, adapted); epsilon's dtype does not change it."""
    check_values(make_case(np.random.default_rng(0), 4, [(3, 2), (5,)], dtypes, "array"), 4)


@pytest.mark.parametrize("which", ["params", "adapted", "all"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_noncontiguous(layout, which):
    lay = tuple(layout if which in (n, "all") else "contiguous" for n in ("params", "adapted"))
    for dtype in DTYPES:
        rng = np.random.default_rng(1)
        check_values(make_case(rng, 3, [(4, 5), (2, 3, 2), (6,)], dtype, "array", lay), 3)


def test_tasks_that_did_not_move_are_a_fixed_point():
    """adapted as a broadcast of params over tasks leaves params unchanged for any epsilon."""
    rng = np.random.default_rng(2)
    p = {"w": rand(rng, (3, 4)), "b": rand(rng, (4,))}
    adapted = tree_map(lambda v: mx.broadcast_to(v, (5, *v.shape)), p)
    for eps in (0.5, mx.array(1.5)):
        assert_tree_close(
            ops.reptile_update(p, adapted, eps), p, mx.float32, rtol=1e-6, label=f"epsilon={eps}"
        )


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "broadcast"])
@pytest.mark.parametrize("eps_kind", EPS_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_large_trees(dtype, eps_kind, layout):
    """Leaves large enough for vectorized and threaded kernels, and many small ones."""
    rng = np.random.default_rng(16)
    shapes = [(256, 512), (1000,), (3, 7, 129)] + [(5,)] * 40
    check_values(make_case(rng, 6, shapes, dtype, eps_kind, (layout,) * 2), 6)


EMPTY = [
    pytest.param(0, [(3,), (2, 2)], id="T=0"),
    pytest.param(0, [()], id="T=0-scalar_params"),
    pytest.param(2, [(0,), (3,)], id="empty_leaf"),
    pytest.param(3, [(3, 0, 2)], id="empty_inner_axis"),
]


@pytest.mark.parametrize("eps_kind", EPS_KINDS)
def test_many_leaves(eps_kind):
    """A tree split over several primitives: values, gradients, vmap and compile."""
    rng = np.random.default_rng(18)
    case = make_case(rng, 3, MANY_LEAVES, mx.float32, eps_kind)
    check_values(case, 3)
    check_grads(case.op, case.ref, case.args, case.names, rng)
    in_axes = (0,) * len(case.args)
    check_vmap(case.op, case.ref, batched(rng, case.args, in_axes), in_axes)
    check_compile(case.op, case.args, rng)


@pytest.mark.parametrize("eps_kind", EPS_KINDS)
@pytest.mark.parametrize("t, shapes", EMPTY)
def test_empty_dims(t, shapes, eps_kind):
    """T = 0 gives NaN, as mx.mean over an empty axis does."""
    rng = np.random.default_rng(3)
    for dtype in DTYPES:
        case = make_case(rng, t, shapes, dtype, eps_kind)
        check_values(case, max(t, 1))
        if t == 0:
            for leaf in case.op(*case.args)["w"], mx.mean(case.args[case.n], axis=0):
                assert np.isnan(to_np(leaf)).all(), f"T=0: expected NaN, got {leaf}"
    if t > 0:
        case = make_case(rng, t, shapes, mx.float32, eps_kind)
        check_grads(case.op, case.ref, case.args, case.names, rng)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@given(tree=tree_shapes(), eps_kind=st.sampled_from(EPS_KINDS), seed=seeds)
def test_grads_match_reference(dtype, tree, eps_kind, seed):
    t, shapes = tree
    rng = np.random.default_rng(seed)
    case = make_case(rng, t, shapes, dtype, eps_kind)
    check_grads(case.op, case.ref, case.args, case.names, rng, k=60)


@pytest.mark.parametrize("eps_kind", EPS_KINDS)
def test_grads_finite_differences(eps_kind):
    rng = np.random.default_rng(4)
    case = make_case(rng, 3, [(3,), (2, 2)], mx.float32, eps_kind, ("strided", "transposed"))
    check_grads_fd(case.op, case.args, case.names, rng)


@pytest.mark.parametrize("inner", [0, 2, 4], ids=["dparams", "dadapted", "depsilon"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=dtype_name)
def test_second_order(dtype, inner):
    rng = np.random.default_rng(5)
    case = make_case(rng, 3, [(4,), (2, 3)], dtype, "array")
    check_second_order(case.op, case.ref, case.args, case.names, inner, rng, k=8)


@pytest.mark.parametrize("eps_kind", EPS_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_jvp(dtype, eps_kind):
    rng = np.random.default_rng(6)
    case = make_case(rng, 3, [(3,), (2, 2)], dtype, eps_kind, ("swapped", "reversed"))
    check_jvp(case.op, case.ref, case.args, case.names, rng)


def vmap_cases():
    for eps_kind in EPS_KINDS:
        case = make_case(np.random.default_rng(0), 3, [(2, 3)], mx.float32, eps_kind)
        for axes in in_axes_combos([a.ndim for a in case.args]):
            yield pytest.param(eps_kind, axes, id=f"eps_{eps_kind}-{axes_id(axes)}")


@pytest.mark.parametrize("eps_kind, in_axes", list(vmap_cases()))
def test_vmap_in_axes(eps_kind, in_axes):
    rng = np.random.default_rng(7)
    case = make_case(rng, 3, [(2, 3)], mx.float32, eps_kind)
    check_vmap(case.op, case.ref, batched(rng, case.args, in_axes), in_axes, k=3)


def multi_leaf_axes():
    """A fixed sample of in_axes over a three-leaf tree (all combinations are too many)."""
    case = make_case(np.random.default_rng(0), 2, [(3,), (2, 2), ()], mx.float32, "array")
    combos = in_axes_combos([a.ndim for a in case.args])
    picks = np.random.default_rng(0).choice(len(combos), size=12, replace=False)
    return [combos[i] for i in sorted(picks)]


@pytest.mark.parametrize("in_axes", multi_leaf_axes(), ids=axes_id)
def test_vmap_multi_leaf(in_axes):
    rng = np.random.default_rng(8)
    case = make_case(rng, 2, [(3,), (2, 2), ()], mx.float16, "array")
    check_vmap(case.op, case.ref, batched(rng, case.args, in_axes), in_axes, k=2)


def test_nested_vmap():
    rng = np.random.default_rng(9)
    case = make_case(rng, 3, [(3,), (2, 2)], mx.float32, "array")
    inner, outer = (0, None, 1, 0, None), (1, 0, None, 2, 0)
    args = batched(rng, batched(rng, case.args, inner), outer)
    got = mx.vmap(mx.vmap(case.op, in_axes=inner), in_axes=outer)(*args)
    from_ref = mx.vmap(mx.vmap(case.ref, in_axes=inner), in_axes=outer)(*args)
    looped = loop_vmap(lambda *a: loop_vmap(case.op, a, inner), args, outer)
    assert_tree_close(got, from_ref, mx.float32, label="nested vmap vs reference")
    assert_tree_close(got, looped, mx.float32, label="nested vmap vs loop")


@pytest.mark.parametrize("eps_kind", EPS_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_compile(dtype, eps_kind):
    rng = np.random.default_rng(10)
    case = make_case(rng, 3, [(3,), (2, 2)], dtype, eps_kind)
    step = case.op
    check_compile(lambda *a: tree_map(lambda v: mx.cos(v) * 3, step(*a)), case.args, rng, k=3)


@pytest.mark.parametrize("bad", BAD_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("which", ["params", "adapted", "epsilon"])
def test_bad_dtype(which, bad):
    case = make_case(np.random.default_rng(11), 2, [(3,), (2, 2)], mx.float32, "array")
    i = {"params": 1, "adapted": 3, "epsilon": 4}[which]
    args = list(case.args)
    args[i] = args[i].astype(bad)
    check_raises(TypeError, lambda: case.op(*args), [which])


def trees(rng):
    p = {"w": rand(rng, (3,)), "b": [rand(rng, (2, 2))]}
    return p, tree_map(lambda v: rand(rng, (4, *v.shape)), p)


@pytest.mark.parametrize("kind", ["missing_key", "extra_key", "list_length", "dict_vs_list"])
def test_mismatched_trees(kind):
    rng = np.random.default_rng(12)
    p, adapted = trees(rng)
    if kind == "missing_key":
        del adapted["b"]
    elif kind == "extra_key":
        adapted["c"] = rand(rng, (4, 3))
    elif kind == "list_length":
        adapted["b"].append(rand(rng, (4, 2, 2)))
    else:
        adapted["b"] = {"0": adapted["b"][0]}
    check_raises(ValueError, lambda: ops.reptile_update(p, adapted, 0.1), ["adapted"])


BAD_SHAPES = [
    # (id, param shape, adapted shape, names in the message)
    ("no_task_axis", (2, 3), (2, 3), ["adapted"]),
    ("inner_shape", (2, 3), (4, 2, 4), ["adapted"]),
    ("rank", (2, 3), (4, 2, 3, 1), ["adapted"]),
    ("scalar_param", (), (4, 1), ["adapted"]),
]


@pytest.mark.parametrize("p_s, a_s, names", [pytest.param(*c[1:], id=c[0]) for c in BAD_SHAPES])
def test_bad_shapes(p_s, a_s, names):
    rng = np.random.default_rng(13)
    p, a = {"w": rand(rng, p_s)}, {"w": rand(rng, a_s)}
    check_raises(ValueError, lambda: ops.reptile_update(p, a, 0.1), names, [p_s, a_s])


@pytest.mark.parametrize("shape", [(1,), (2,), (1, 1)])
def test_epsilon_not_scalar(shape):
    p, adapted = trees(np.random.default_rng(14))
    eps = mx.full(shape, 0.1)
    check_raises(ValueError, lambda: ops.reptile_update(p, adapted, eps), ["epsilon"], [shape])


@pytest.mark.parametrize("eps", [math.nan, math.inf, -math.inf, -1e39])
def test_non_finite_epsilon(eps):
    p, adapted = trees(np.random.default_rng(15))
    check_raises(ValueError, lambda: ops.reptile_update(p, adapted, eps), ["epsilon"])
