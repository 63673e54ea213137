"""ops.squared_distance: ``sum((params - other) ** 2)`` over every leaf of two trees."""

import io
import re

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import (
    BAD_DTYPES,
    DTYPES,
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
    dtype_name,
    in_axes_combos,
    layouts,
    loop_vmap,
    nest,
    rand,
    seeds,
    to_np,
    tree_shapes,
)
from metapeft import ops
from metapeft import reference as ref


class Case:
    """A squared_distance call over flat leaves: params, then other."""

    def __init__(self, params, other):
        self.n = len(params)
        self.args = [*params, *other]
        self.names = [f"params[{i}]" for i in range(self.n)] + [
            f"other[{i}]" for i in range(self.n)
        ]

    def call(self, fn):
        return lambda *a: fn(nest(a[: self.n]), nest(a[self.n :]))

    @property
    def op(self):
        return self.call(ops.squared_distance)

    @property
    def ref(self):
        return self.call(ref.squared_distance)

    def numpy(self):
        v = [to_np(a).astype(np.float64) for a in self.args]
        pairs = zip(v[: self.n], v[self.n :], strict=True)
        return sum(float(np.sum((p - o) ** 2)) for p, o in pairs)


def make_case(rng, shapes, dtypes, lay=("contiguous",) * 2):
    """``dtypes``: one dtype, or (params, other) dtypes."""
    if not isinstance(dtypes, (list, tuple)):
        dtypes = (dtypes,) * 2
    params = [rand(rng, s, dtypes[0], lay[0]) for s in shapes]
    other = [rand(rng, s, dtypes[1], lay[1]) for s in shapes]
    return Case(params, other)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@given(tree=tree_shapes(), lay=st.tuples(layouts, layouts), seed=seeds)
def test_values(dtype, tree, lay, seed):
    _, shapes = tree
    case = make_case(np.random.default_rng(seed), shapes, dtype, lay)
    out = case.op(*case.args)
    k = sum(int(np.prod(s)) for s in shapes)
    assert_close(out, case.ref(*case.args), mx.float32, k=k, label="vs reference")
    assert_close(out, case.numpy(), mx.float32, k=k, label="vs numpy")


@pytest.mark.parametrize("dtypes", [(mx.float32, mx.bfloat16), (mx.float16, mx.float32)])
def test_mixed_dtypes_give_float32(dtypes):
    case = make_case(np.random.default_rng(1), [(3,), (2, 2)], dtypes)
    out = case.op(*case.args)
    assert_close(out, case.numpy(), mx.float32, k=7, label="mixed dtypes")


def test_empty_tree_and_empty_leaves():
    assert ops.squared_distance({}, {}).item() == 0.0
    rng = np.random.default_rng(2)
    case = make_case(rng, [(0, 3), (2,)], mx.float32)
    assert_close(case.op(*case.args), case.numpy(), mx.float32, k=2, label="empty leaf")


def test_large_leaf_is_accurate():
    """A million elements, summed without float32 drift (float64 on the CPU)."""
    rng = np.random.default_rng(3)
    case = make_case(rng, [(1000, 1000)], mx.float32)
    assert_close(case.op(*case.args), case.numpy(), mx.float32, rtol=1e-6, label="1e6 elements")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@given(tree=tree_shapes(), seed=seeds)
def test_grads_match_reference(dtype, tree, seed):
    _, shapes = tree
    rng = np.random.default_rng(seed)
    case = make_case(rng, shapes, dtype)
    check_grads(case.op, case.ref, case.args, case.names, rng, k=60)


def test_grads_finite_differences():
    rng = np.random.default_rng(4)
    case = make_case(rng, [(3,), (2, 2)], mx.float32, ("strided", "transposed"))
    check_grads_fd(case.op, case.args, case.names, rng)


@pytest.mark.parametrize("inner", [0, 2], ids=["dparams", "dother"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=dtype_name)
def test_second_order(dtype, inner):
    rng = np.random.default_rng(5)
    case = make_case(rng, [(4,), (2, 3)], dtype)
    check_second_order(case.op, case.ref, case.args, case.names, inner, rng, k=8)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_jvp(dtype):
    rng = np.random.default_rng(6)
    case = make_case(rng, [(3,), (2, 2)], dtype, ("swapped", "reversed"))
    check_jvp(case.op, case.ref, case.args, case.names, rng, k=7)


def vmap_cases():
    case = make_case(np.random.default_rng(0), [(2, 3), (4,)], mx.float32)
    return in_axes_combos([a.ndim for a in case.args])


@pytest.mark.parametrize("in_axes", vmap_cases(), ids=axes_id)
def test_vmap_in_axes(in_axes):
    """Every way to map the leaves, including the learners' way: params mapped over
    tasks, other (the meta-parameters) shared."""
    rng = np.random.default_rng(7)
    case = make_case(rng, [(2, 3), (4,)], mx.float32)
    check_vmap(case.op, case.ref, batched(rng, case.args, in_axes), in_axes, k=10)


@pytest.mark.parametrize(
    "inner, outer",
    [((0, 0, None, None), (1, 0, 0, None)), ((0, None, 1, 0), (None, 1, 0, 0))],
    ids=["shared_other", "mixed"],
)
def test_nested_vmap(inner, outer):
    rng = np.random.default_rng(8)
    case = make_case(rng, [(3,), (2, 2)], mx.float32)
    args = batched(rng, batched(rng, case.args, inner), outer)
    got = mx.vmap(mx.vmap(case.op, in_axes=inner), in_axes=outer)(*args)
    from_ref = mx.vmap(mx.vmap(case.ref, in_axes=inner), in_axes=outer)(*args)
    looped = loop_vmap(lambda *a: loop_vmap(case.op, a, inner), args, outer)
    assert_close(got, from_ref, mx.float32, k=7, label="nested vmap vs reference")
    assert_close(got, looped, mx.float32, k=7, label="nested vmap vs loop")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_compile(dtype):
    rng = np.random.default_rng(9)
    case = make_case(rng, [(3,), (2, 2)], dtype)
    step = case.op
    check_compile(lambda *a: mx.cos(step(*a)) * 3, case.args, rng, k=7)


@pytest.mark.parametrize("bad", BAD_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("which", ["params", "other"])
def test_bad_dtype(which, bad):
    case = make_case(np.random.default_rng(10), [(3,), (2, 2)], mx.float32)
    args = list(case.args)
    i = 1 if which == "params" else 3
    args[i] = args[i].astype(bad)
    check_raises(TypeError, lambda: case.op(*args), [which])


@pytest.mark.parametrize(
    "kind", ["missing_key", "extra_key", "list_length", "not_an_array", "empty_container"]
)
def test_mismatched_trees(kind):
    rng = np.random.default_rng(11)
    p = {"w": rand(rng, (3,)), "b": [rand(rng, (2, 2))]}
    other = {"w": rand(rng, (3,)), "b": [rand(rng, (2, 2))]}
    if kind == "missing_key":
        del other["b"]
    elif kind == "extra_key":
        other["c"] = rand(rng, (3,))
    elif kind == "list_length":
        other["b"].append(rand(rng, (2, 2)))
    elif kind == "empty_container":
        other["dropout"] = {}
    else:
        other["w"] = [1.0, 2.0, 3.0]
    exc = TypeError if kind == "not_an_array" else ValueError
    names = ["other", "other containers"] if kind == "empty_container" else ["other"]
    check_raises(exc, lambda: ops.squared_distance(p, other), names)


@pytest.mark.parametrize("p_s, o_s", [((2, 3), (3, 2)), ((3,), (1, 3)), ((), (1,))])
def test_bad_shapes(p_s, o_s):
    rng = np.random.default_rng(12)
    p, o = {"w": rand(rng, p_s)}, {"w": rand(rng, o_s)}
    check_raises(ValueError, lambda: ops.squared_distance(p, o), ["other['w']"], [p_s, o_s])


def test_under_vmap_over_tasks_it_is_one_node():
    """The learners' use: params mapped over tasks, other (the meta-parameters)
    shared; one primitive per meta-batch, whatever the number of leaves."""
    rng = np.random.default_rng(13)
    params = {"w": rand(rng, (5, 2, 3)), "b": rand(rng, (5, 3))}
    other = {"w": rand(rng, (2, 3)), "b": rand(rng, (3,))}
    out = mx.vmap(ops.squared_distance, in_axes=(0, None))(params, other)
    graph = io.StringIO()
    mx.export_to_dot(graph, out)
    assert re.findall(r'label ="(\w+)"', graph.getvalue()) == ["MetapeftSquaredDistance"]
    expected = mx.vmap(ref.squared_distance, in_axes=(0, None))(params, other)
    assert_close(out, expected, mx.float32, k=9, label="per task")
