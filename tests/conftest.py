"""Shared helpers for the tests of the fused primitives in :mod:`metapeft.ops`.

As in MLX's own tests, every comparison checks the shape, then the dtype, then the
values, and says what it expected and what it got. Each op is compared with its
pure-MLX twin in :mod:`metapeft.reference` and with a float64 numpy computation.

The test files import the helpers below with ``from conftest import ...``.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# `python -m pytest` from the repository root puts the root on sys.path, where the
# metapeft sources have no compiled `_ext`; the tests run against the installed package.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _ROOT]

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402

# The device comes from the environment, as in MLX's tests (DEVICE=gpu on Apple).
mx.set_default_device(mx.gpu if os.getenv("DEVICE", "cpu") == "gpu" else mx.cpu)

# Hypothesis: no deadline (timings vary with the machine's load), and few enough examples
# that the whole suite stays well under 5 minutes on 2 cores. HYPOTHESIS_PROFILE=ci makes
# runs reproducible, HYPOTHESIS_PROFILE=thorough searches ten times harder.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("default", max_examples=40, **_COMMON)
settings.register_profile("ci", max_examples=40, derandomize=True, database=None, **_COMMON)
settings.register_profile("thorough", max_examples=400, **_COMMON)
settings.load_profile(os.getenv("HYPOTHESIS_PROFILE", "default"))


def pytest_configure(config):
    """When benchmarks are timed, time them under ``metapeft bench``'s conditions."""
    timed = not config.getoption("benchmark_disable", True) and (
        config.getoption("benchmark_only") or not config.getoption("benchmark_skip")
    )
    if timed:
        from metapeft.bench.runner import prepare_process

        config.stash[BENCHMARK_CONDITIONS] = prepare_process()


def pytest_benchmark_update_machine_info(config, machine_info):
    """Stamp pytest-benchmark results with the machine (chip, MLX backend, BLAS, commit)
    and the conditions they ran under."""
    from metapeft import machine

    machine_info["metapeft_machine"] = machine.info()
    machine_info["metapeft_conditions"] = config.stash.get(BENCHMARK_CONDITIONS, {})


BENCHMARK_CONDITIONS = pytest.StashKey[dict]()


DTYPES = [mx.float32, mx.float16, mx.bfloat16]
# Leaf shapes of a tree larger than one primitive takes (the tree updates build one
# per 16 leaves): 37 leaves, three primitives.
MANY_LEAVES = [(3,), (2, 2), ()] * 12 + [(4,)]
BAD_DTYPES = [mx.int32, mx.complex64, mx.float64]

_BASE_TOL = {mx.float32: 1e-4, mx.float16: 1e-2, mx.bfloat16: 5e-2}


def dtype_name(dtype: mx.Dtype) -> str:
    """``float16`` for ``mx.float16``: readable test ids."""
    return str(dtype).rsplit(".", 1)[-1]


def tol(dtype: mx.Dtype, k: int = 1) -> float:
    """Relative tolerance for a result of ``dtype`` built from reductions of length ``k``.

    Rounding errors of a sum grow like sqrt(k); the base tolerance covers k <= 16.
    """
    return _BASE_TOL[dtype] * max(1.0, math.sqrt(k / 16))


def coarsest(*dtypes: mx.Dtype) -> mx.Dtype:
    """The least precise of ``dtypes`` (the one with the loosest tolerance)."""
    return max(dtypes, key=lambda d: _BASE_TOL[d])


def promote(*dtypes: mx.Dtype) -> mx.Dtype:
    """MLX's type promotion of ``dtypes``."""
    return mx.result_type(*dtypes)


def to_np(a: Any) -> np.ndarray:
    """An mx.array (any float dtype, any layout) or array-like as float64 numpy."""
    if isinstance(a, mx.array):
        if a.dtype == mx.bfloat16:
            a = a.astype(mx.float32)
        return np.array(a).astype(np.float64)
    return np.asarray(a, dtype=np.float64)


# --------------------------------------------------------------------------- checks


def assert_close(
    got: Any,
    expected: Any,
    dtype: mx.Dtype | None,
    *,
    k: int = 1,
    rtol: float | None = None,
    label: str = "output",
) -> None:
    """Checks shape, then dtype (when ``dtype`` is given), then values.

    Values must agree to ``rtol`` (default ``tol(dtype, k)``) relative to each element
    and, absolutely, to ``rtol`` times the largest magnitude in ``expected`` (at least 1),
    so that cancellation in a sum does not count as an error. NaN must match NaN.
    """
    exp = to_np(expected)
    assert isinstance(got, mx.array), f"{label}: expected an mx.array, got {type(got).__name__}"
    assert tuple(got.shape) == exp.shape, (
        f"{label}: shape mismatch expected={exp.shape} got={tuple(got.shape)}"
    )
    if dtype is not None:
        assert got.dtype == dtype, f"{label}: dtype mismatch expected={dtype} got={got.dtype}"
    if rtol is None:
        rtol = tol(dtype if dtype is not None else got.dtype, k)
    val = to_np(got)
    finite = np.abs(exp[np.isfinite(exp)])
    atol = rtol * max(1.0, float(finite.max()) if finite.size else 1.0)
    ok = np.isclose(val, exp, rtol=rtol, atol=atol, equal_nan=True)
    if not ok.all():
        bad = np.argwhere(~ok)
        idx = tuple(bad[0])
        err = np.nanmax(np.abs(val - exp)) if val.size else 0.0
        raise AssertionError(
            f"{label}: values mismatch in {len(bad)} of {exp.size} elements "
            f"(rtol={rtol:.2g}, atol={atol:.2g}, max abs err={err:.3g}); "
            f"first at {idx}: expected={exp[idx]!r} got={val[idx]!r}"
        )


def assert_tree_close(
    got: Any,
    expected: Any,
    dtypes: Any,
    *,
    k: int = 1,
    rtol: float | None = None,
    label: str = "output",
) -> None:
    """``assert_close`` leaf by leaf, after checking that both trees have the same leaves.

    ``dtypes`` is one dtype for every leaf, a list with one per leaf, or None.
    """
    got_flat, exp_flat = tree_flatten(got), tree_flatten(expected)
    got_keys, exp_keys = [k_ for k_, _ in got_flat], [k_ for k_, _ in exp_flat]
    assert got_keys == exp_keys, f"{label}: tree mismatch expected={exp_keys} got={got_keys}"
    if not isinstance(dtypes, (list, tuple)):
        dtypes = [dtypes] * len(exp_flat)
    for (key, g), (_, e), d in zip(got_flat, exp_flat, dtypes, strict=True):
        assert_close(g, e, d, k=k, rtol=rtol, label=f"{label}[{key!r}]" if key else label)


def check_raises(
    exc: type[Exception],
    call: Callable[[], Any],
    names: Sequence[str],
    shapes: Sequence[Sequence[int]] = (),
) -> None:
    """``call()`` raises ``exc`` at once (before evaluation), naming every argument in
    ``names`` and, when ``shapes`` are given, showing at least one of them as a tuple."""
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    for name in names:
        pattern = rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])"
        assert re.search(pattern, msg), f"{exc.__name__} message should name {name!r}, got {msg!r}"
    if shapes:
        shown = [str(tuple(s)) for s in shapes]
        assert any(s in msg for s in shown), (
            f"{exc.__name__} message should show one of the shapes {shown}, got {msg!r}"
        )


# --------------------------------------------------------------------------- arrays

# Memory layouts the kernels must read: row-contiguous, the last two axes swapped, all
# axes reversed (a full transpose), every other element from an offset, negative steps,
# and a broadcast view (stride 0 on the first axis).
LAYOUTS = ("contiguous", "swapped", "transposed", "strided", "reversed", "broadcast")


def rand(
    rng: np.random.Generator,
    shape: Sequence[int],
    dtype: mx.Dtype = mx.float32,
    layout: str = "contiguous",
) -> mx.array:
    """Uniform(-1, 1) values of ``shape`` and ``dtype`` stored in ``layout``.

    A layout that needs more axes than ``shape`` has falls back to a simpler one. Tests
    derive their expectations from the returned array (``to_np``), never from the draw,
    since a broadcast view repeats values.
    """
    shape = tuple(shape)
    nd = len(shape)
    if math.prod(shape) == 0:
        # Empty arrays come from mx.zeros, not numpy: in MLX 0.32.4, after any other
        # evaluation, `mx.sum(mx.array(np.zeros((0, 3))), axis=0)` hangs in the CPU
        # reduction (nd_loop) about one run in three.
        return mx.zeros(shape, dtype)
    if layout in ("swapped", "transposed") and nd < 2:
        layout = "strided"
    if nd == 0:
        layout = "contiguous"

    def base(base_shape: Sequence[int]) -> mx.array:
        arr = mx.array(rng.uniform(-1.0, 1.0, size=tuple(base_shape))).astype(dtype)
        mx.eval(arr)
        return arr

    if layout == "contiguous":
        return base(shape)
    if layout == "swapped":
        return mx.swapaxes(base(shape[:-2] + (shape[-1], shape[-2])), -1, -2)
    if layout == "transposed":
        return mx.transpose(base(shape[::-1]))
    if layout == "strided":
        big = base(tuple(2 * s + 1 for s in shape))
        return big[tuple(slice(1, None, 2) for _ in shape)]
    if layout == "reversed":
        flip = slice(None, None, -1)
        return base(shape)[(flip,) if nd == 1 else (flip, Ellipsis, flip)]
    if layout == "broadcast":
        return mx.broadcast_to(base((1,) + shape[1:]), shape)
    raise ValueError(f"unknown layout {layout!r}")


def like(rng: np.random.Generator, tree: Any) -> Any:
    """Random contiguous arrays with the shapes and dtypes of the leaves of ``tree``."""
    return tree_map(lambda a: rand(rng, a.shape, a.dtype), tree)


def nest(leaves: Sequence[Any]) -> Any:
    """A nested dict/list tree over ``leaves`` (same layout for the same count)."""
    tree: dict[str, Any] = {"w": leaves[0]}
    if len(leaves) > 1:
        tree["layers"] = [({"b": leaf} if i % 2 else leaf) for i, leaf in enumerate(leaves[1:])]
    return tree


def leaves(tree: Any) -> list[mx.array]:
    return [v for _, v in tree_flatten(tree)]


# --------------------------------------------------------------------------- numpy twins


def np_matmul_rows(x: np.ndarray, w: np.ndarray, per_task: bool) -> np.ndarray:
    """``x @ w`` over the last axis of x: x (..., k), w (k, n); per task x (T, ..., k),
    w (T, k, n). Written with explicit sizes so that empty axes work."""
    k, n = w.shape[-2], w.shape[-1]
    if per_task:
        t = x.shape[0]
        rows = math.prod(x.shape[1:-1])
        out = np.einsum("tmk,tkn->tmn", x.reshape(t, rows, k), w)
    else:
        out = x.reshape(math.prod(x.shape[:-1]), k) @ w
    return out.reshape(*x.shape[:-1], n)


def np_bias(b: np.ndarray | None, ndim: int) -> np.ndarray | float:
    """A ``(d_out,)`` or per-task ``(T, d_out)`` bias shaped to broadcast over ``ndim`` dims."""
    if b is None:
        return 0.0
    if b.ndim == 2:
        return b.reshape(b.shape[0], *([1] * (ndim - 2)), b.shape[1])
    return b


def np_linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """float64 ``x @ w.T + b`` with a shared (2-D) or per-task (3-D) weight."""
    per_task = w.ndim == 3
    return np_matmul_rows(x, np.swapaxes(w, -1, -2), per_task) + np_bias(b, x.ndim)


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class LayerShape:
    """Sizes of one (LoRA) linear layer call; ``lead`` are the row axes of x."""

    per_task: bool
    T: int
    lead: tuple[int, ...]
    d_in: int
    d_out: int
    r: int = 1

    @property
    def task(self) -> tuple[int, ...]:
        return (self.T,) if self.per_task else ()

    @property
    def x(self) -> tuple[int, ...]:
        return self.task + self.lead + (self.d_in,)

    @property
    def weight(self) -> tuple[int, ...]:
        return self.task + (self.d_out, self.d_in)

    @property
    def lora_a(self) -> tuple[int, ...]:
        return self.task + (self.d_in, self.r)

    @property
    def lora_b(self) -> tuple[int, ...]:
        return self.task + (self.r, self.d_out)

    def bias(self, kind: str | None) -> tuple[int, ...] | None:
        """``None``, ``"shared"`` (d_out,) or ``"task"`` (T, d_out) (shared when not per task)."""
        if kind is None:
            return None
        return (self.T, self.d_out) if kind == "task" and self.per_task else (self.d_out,)

    @property
    def rows(self) -> int:
        return math.prod(self.lead)


@st.composite
def layer_shapes(draw: Any, per_task: bool | None = None) -> LayerShape:
    """x of rank 1..4 (2..4 per task) with size-1 axes likely, T 1..6, r 1..16."""
    if per_task is None:
        per_task = draw(st.booleans())
    rank = draw(st.integers(2 if per_task else 1, 4))
    small = st.integers(1, 5)
    lead = draw(st.lists(small, min_size=rank - 1 - per_task, max_size=rank - 1 - per_task))
    return LayerShape(
        per_task=per_task,
        T=draw(st.integers(1, 6)),
        lead=tuple(lead),
        d_in=draw(st.integers(1, 24)),
        d_out=draw(st.integers(1, 24)),
        r=draw(st.integers(1, 16)),
    )


@st.composite
def tree_shapes(draw: Any) -> tuple[int, list[tuple[int, ...]]]:
    """``(T, leaf shapes without the task axis)``: 1..3 leaves of rank 0..3, T 1..6."""
    t = draw(st.integers(1, 6))
    shape = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)
    return t, draw(st.lists(shape, min_size=1, max_size=3))


seeds = st.integers(0, 2**32 - 1)
layouts = st.sampled_from(LAYOUTS)


# --------------------------------------------------------------------------- autodiff


def dot_loss(out: Any, cot: Any) -> mx.array:
    """``<cot, out>`` summed over all leaves, in float32."""
    terms = [
        mx.sum(o.astype(mx.float32) * c.astype(mx.float32))
        for o, c in zip(leaves(out), leaves(cot), strict=True)
    ]
    return sum(terms[1:], terms[0])


def dot_np(a: Any, b: Any, absolute: bool = False) -> float:
    """``<a, b>`` over all leaves in float64 (``<|a|, |b|>`` with ``absolute``): the
    magnitude that rounding errors of a sum of products scale with."""
    total = 0.0
    for x, y in zip(leaves(a), leaves(b), strict=True):
        prod = to_np(x) * to_np(y)
        total += float(np.sum(np.abs(prod) if absolute else prod))
    return total


def _as_tuple(g: Any) -> tuple:
    return g if isinstance(g, tuple) else (g,)


def argnum_sets(n: int) -> list[tuple[int, ...]]:
    """Each argument alone, then all of them at once."""
    return [(i,) for i in range(n)] + ([tuple(range(n))] if n > 1 else [])


def check_grads(
    op_fn: Callable,
    ref_fn: Callable,
    args: Sequence[mx.array],
    names: Sequence[str],
    rng: np.random.Generator,
    *,
    k: int = 1,
) -> None:
    """``mx.value_and_grad`` of ``<c, fn(*args)>`` for the op equals that of the reference,
    with respect to each argument alone and to all at once. Gradients keep the dtype of
    their argument."""
    cot = like(rng, ref_fn(*args))

    def loss(fn: Callable) -> Callable:
        return lambda *a: dot_loss(fn(*a), cot)

    for argnums in argnum_sets(len(args)):
        val, g_op = mx.value_and_grad(loss(op_fn), argnums=argnums)(*args)
        ref_val, g_ref = mx.value_and_grad(loss(ref_fn), argnums=argnums)(*args)
        g_op, g_ref = _as_tuple(g_op), _as_tuple(g_ref)
        assert len(g_op) == len(argnums), f"expected {len(argnums)} gradients, got {len(g_op)}"
        dt = coarsest(*(a.dtype for a in args))
        # The loss sums many rounded products: its error scales with <|c|, |out|>.
        scale = max(1.0, dot_np(cot, ref_fn(*args), absolute=True))
        assert abs(val.item() - ref_val.item()) <= tol(dt, k) * scale, (
            f"value (argnums={argnums}): expected={ref_val.item()!r} got={val.item()!r} "
            f"(atol={tol(dt, k) * scale:.3g})"
        )
        for i, go, gr in zip(argnums, g_op, g_ref, strict=True):
            assert_close(
                go,
                gr,
                args[i].dtype,
                k=k,
                rtol=tol(dt, k),
                label=f"grad[{names[i]}] (argnums={argnums})",
            )


def fd_grad(
    fn: Callable, args: Sequence[mx.array], argnum: int, cot: Any, eps: float = 1e-2
) -> np.ndarray:
    """Central finite differences of ``<cot, fn(*args)>`` with respect to ``args[argnum]``,
    perturbing float32 inputs and accumulating in float64 numpy."""
    x0 = to_np(args[argnum])

    def f(x: np.ndarray) -> float:
        a = list(args)
        a[argnum] = mx.array(x.astype(np.float32))
        return dot_np(fn(*a), cot)

    grad = np.zeros_like(x0)
    for idx in np.ndindex(x0.shape):
        up, down = x0.copy(), x0.copy()
        up[idx] += eps
        down[idx] -= eps
        grad[idx] = (f(up) - f(down)) / (2 * eps)
    return grad


def check_grads_fd(
    op_fn: Callable,
    args: Sequence[mx.array],
    names: Sequence[str],
    rng: np.random.Generator,
    *,
    rtol: float = 2e-3,
) -> None:
    """float32 gradients of ``<c, op_fn(*args)>`` (each argument alone, then all at
    once) agree with central finite differences."""
    cot = like(rng, op_fn(*args))
    expected = [fd_grad(op_fn, args, i, cot) for i in range(len(args))]
    for argnums in argnum_sets(len(args)):
        grads = _as_tuple(mx.grad(lambda *a: dot_loss(op_fn(*a), cot), argnums=argnums)(*args))
        for i, g in zip(argnums, grads, strict=True):
            assert_close(
                g,
                expected[i],
                args[i].dtype,
                rtol=rtol,
                label=f"grad[{names[i]}] vs finite differences (argnums={argnums})",
            )


def check_second_order(
    op_fn: Callable,
    ref_fn: Callable,
    args: Sequence[mx.array],
    names: Sequence[str],
    inner: int,
    rng: np.random.Generator,
    *,
    k: int = 1,
) -> None:
    """``mx.grad`` of ``sum(c2 * sin(g))``, where ``g`` is the gradient of
    ``<c, tanh(fn(*args))>`` with respect to ``args[inner]``: op against reference, with
    respect to each argument alone and to all at once."""
    cot = like(rng, ref_fn(*args))
    cot2 = rand(rng, args[inner].shape)

    def outer(fn: Callable) -> Callable:
        def inner_loss(*a: mx.array) -> mx.array:
            return dot_loss(tree_map(mx.tanh, fn(*a)), cot)

        def f(*a: mx.array) -> mx.array:
            g = mx.grad(inner_loss, argnums=inner)(*a)
            return mx.sum(cot2 * mx.sin(g.astype(mx.float32)))

        return f

    dt = coarsest(*(a.dtype for a in args))
    for argnums in argnum_sets(len(args)):
        g_op = _as_tuple(mx.grad(outer(op_fn), argnums=argnums)(*args))
        g_ref = _as_tuple(mx.grad(outer(ref_fn), argnums=argnums)(*args))
        for i, go, gr in zip(argnums, g_op, g_ref, strict=True):
            assert_close(
                go,
                gr,
                args[i].dtype,
                k=k,
                rtol=tol(dt, k),
                label=f"d/d{names[i]} of a function of d/d{names[inner]} (argnums={argnums})",
            )


def check_jvp(
    op_fn: Callable,
    ref_fn: Callable,
    args: Sequence[mx.array],
    names: Sequence[str],
    rng: np.random.Generator,
    *,
    k: int = 1,
) -> None:
    """``mx.jvp`` of the op equals the reference's, for each primal alone and all at
    once, and satisfies ``<J t, c> == <t, J^T c>`` with the op's ``mx.vjp``."""
    out_ref = ref_fn(*args)
    out_dtypes = [o.dtype for o in leaves(out_ref)]
    cots = leaves(like(rng, out_ref))
    dt = coarsest(*(a.dtype for a in args))
    for argnums in argnum_sets(len(args)):

        def restrict(fn: Callable, argnums: tuple[int, ...] = argnums) -> Callable:
            """``fn`` as a function of ``args[i] for i in argnums``, flat outputs."""

            def f(*values: mx.array) -> list[mx.array]:
                a = list(args)
                for i, p in zip(argnums, values, strict=True):
                    a[i] = p
                return leaves(fn(*a))

            return f

        primals = [args[i] for i in argnums]
        tangents = [rand(rng, args[i].shape, args[i].dtype) for i in argnums]
        out_op, jvp_op = mx.jvp(restrict(op_fn), primals, tangents)
        out_r, jvp_ref = mx.jvp(restrict(ref_fn), primals, tangents)
        label = f"jvp in {[names[i] for i in argnums]}"
        assert_tree_close(out_op, out_r, out_dtypes, k=k, rtol=tol(dt, k), label=label + " out")
        assert_tree_close(jvp_op, jvp_ref, out_dtypes, k=k, rtol=tol(dt, k), label=label)

        _, vjp_op = mx.vjp(restrict(op_fn), primals, cots)
        lhs, rhs = dot_np(jvp_op, cots), dot_np(tangents, vjp_op)
        scale = dot_np(jvp_op, cots, absolute=True)
        assert abs(lhs - rhs) <= tol(dt, k) * max(1.0, scale), (
            f"{label}: <J t, c> != <t, J^T c>: expected={rhs!r} got={lhs!r}"
        )


# --------------------------------------------------------------------------- vmap

VMAP_SIZE = 3


def in_axes_combos(ndims: Sequence[int], with_none: Sequence[bool] | None = None) -> list:
    """Every in_axes over inputs of ``ndims`` (unbatched ranks): each input mapped on
    axis 0, on its last axis (non-zero; scalars have none) or not at all (None), with
    at least one input mapped. ``None`` entries of ``ndims`` are inputs that are None."""
    choices = []
    for nd in ndims:
        if nd is None:
            choices.append([None])
        else:
            choices.append([None, 0] + ([nd] if nd > 0 else []))
    return [c for c in itertools.product(*choices) if any(a is not None for a in c)]


def axes_id(in_axes: Sequence[int | None]) -> str:
    return "-".join("N" if a is None else str(a) for a in in_axes)


def batched(
    rng: np.random.Generator, arrays: Sequence[mx.array | None], in_axes: Sequence[int | None]
) -> list[mx.array | None]:
    """``arrays`` with a new axis of size VMAP_SIZE inserted at each mapped position,
    filled with fresh values (the same dtype)."""
    out = []
    for a, ax in zip(arrays, in_axes, strict=True):
        if a is None or ax is None:
            out.append(a)
        else:
            shape = list(a.shape)
            shape.insert(ax, VMAP_SIZE)
            out.append(rand(rng, shape, a.dtype))
    return out


def unbatch(a: mx.array | None, ax: int | None, i: int) -> mx.array | None:
    if a is None or ax is None:
        return a
    return a[(slice(None),) * ax + (i,)]


def loop_vmap(fn: Callable, args: Sequence[Any], in_axes: Sequence[int | None]) -> Any:
    """The explicit loop that ``mx.vmap(fn, in_axes)`` stands for, stacked on axis 0."""
    sizes = {a.shape[ax] for a, ax in zip(args, in_axes, strict=True) if ax is not None}
    (n,) = sizes
    outs = [fn(*[unbatch(a, ax, i) for a, ax in zip(args, in_axes, strict=True)]) for i in range(n)]
    return tree_map(lambda *xs: mx.stack(xs), *outs)


def check_vmap(
    op_fn: Callable,
    ref_fn: Callable,
    args: Sequence[Any],
    in_axes: Sequence[int | None],
    *,
    k: int = 1,
) -> None:
    """``mx.vmap(op)`` equals ``mx.vmap(reference)`` and the explicit loop over the op."""
    got = mx.vmap(op_fn, in_axes=tuple(in_axes))(*args)
    from_ref = mx.vmap(ref_fn, in_axes=tuple(in_axes))(*args)
    looped = loop_vmap(op_fn, args, in_axes)
    dtypes = [o.dtype for o in leaves(looped)]
    floats = [a for a in args if isinstance(a, mx.array) and mx.issubdtype(a.dtype, mx.floating)]
    dt = coarsest(*(a.dtype for a in floats))
    label = f"vmap(in_axes={tuple(in_axes)})"
    assert_tree_close(got, from_ref, dtypes, k=k, rtol=tol(dt, k), label=label + " vs reference")
    assert_tree_close(got, looped, dtypes, k=k, rtol=tol(dt, k), label=label + " vs loop")


# --------------------------------------------------------------------------- compile


def check_compile(
    fn: Callable, args: Sequence[mx.array], rng: np.random.Generator, *, k: int = 1
) -> None:
    """``mx.compile(fn)`` and ``mx.compile`` of its gradient (all arguments) equal the
    uncompiled results."""
    expected = fn(*args)
    dtypes = [o.dtype for o in leaves(expected)]
    dt = coarsest(*(a.dtype for a in args))
    assert_tree_close(
        mx.compile(fn)(*args), expected, dtypes, k=k, rtol=tol(dt, k), label="compiled"
    )
    cot = like(rng, expected)
    grad = mx.grad(lambda *a: dot_loss(fn(*a), cot), argnums=tuple(range(len(args))))
    assert_tree_close(
        list(_as_tuple(mx.compile(grad)(*args))),
        list(_as_tuple(grad(*args))),
        [a.dtype for a in args],
        k=k,
        rtol=tol(dt, k),
        label="compiled grad",
    )


__all__ = [
    "BAD_DTYPES",
    "DTYPES",
    "LAYOUTS",
    "LayerShape",
    "VMAP_SIZE",
    "assert_close",
    "assert_tree_close",
    "axes_id",
    "batched",
    "check_compile",
    "check_grads",
    "check_grads_fd",
    "check_jvp",
    "check_raises",
    "check_second_order",
    "check_vmap",
    "coarsest",
    "dot_loss",
    "dot_np",
    "dtype_name",
    "fd_grad",
    "in_axes_combos",
    "layer_shapes",
    "layouts",
    "leaves",
    "like",
    "loop_vmap",
    "nest",
    "np_bias",
    "np_linear",
    "np_matmul_rows",
    "promote",
    "rand",
    "seeds",
    "to_np",
    "tol",
    "tree_shapes",
]


# --------------------------------------------------------------------------- runs


def interrupt_training(train_args: Sequence[str], output_dir: Path, after_steps: int) -> str:
    """Runs ``metapeft train`` as a real process into ``output_dir``, sends it SIGINT once
    ``metrics.jsonl`` holds ``after_steps`` lines, and checks that it stopped as Ctrl-C
    should (exit status 130, "interrupted"); returns its output."""
    import shutil
    import signal
    import subprocess
    import time

    exe = shutil.which("metapeft")
    command = [exe] if exe else [sys.executable, "-m", "metapeft"]
    proc = subprocess.Popen(
        [*command, *train_args, "--output-dir", str(output_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = output_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= after_steps:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "interrupted" in out
    return out
