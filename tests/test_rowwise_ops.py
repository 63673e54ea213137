"""The fused non-product ops of a language model's step: ``ops.softmax`` (with the
attention's scale and causal mask), ``ops.cross_entropy`` (and
``ops.linear_cross_entropy``, with the output layer's product), ``ops.sigmoid``, and
``ops.attention`` built on them and on ``ops.linear``; each against its pure-MLX
twin in ``metapeft.reference``."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import (
    BAD_DTYPES,
    DTYPES,
    assert_close,
    check_compile,
    check_grads,
    check_grads_fd,
    check_jvp,
    check_raises,
    check_second_order,
    check_vmap,
    dtype_name,
    layouts,
    rand,
    seeds,
    tol,
)
from metapeft import ops, reference


def check_vmap_grads(op, ref, args, in_axes, k=1):
    """The gradients of ``sum(op(*args) ** 2)`` under ``mx.vmap`` equal the reference's."""
    argnums = tuple(range(len(args)))
    grad = mx.grad(lambda *a: (op(*a) ** 2).sum(), argnums=argnums)
    grad_ref = mx.grad(lambda *a: (ref(*a) ** 2).sum(), argnums=argnums)
    got = mx.vmap(grad, in_axes=tuple(in_axes))(*args)
    expected = mx.vmap(grad_ref, in_axes=tuple(in_axes))(*args)
    for g, e in zip(got, expected, strict=True):
        assert_close(g, e, mx.float32, k=k)


# --------------------------------------------------------------------------- softmax

score_shapes = st.lists(st.integers(1, 7), min_size=2, max_size=4).map(tuple)


def softmax_fns(scale, causal):
    return (
        lambda x: ops.softmax(x, scale, causal),
        lambda x: reference.softmax(x, scale, causal),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@given(
    shape=score_shapes,
    scale=st.floats(-3, 3),
    causal=st.booleans(),
    layout=layouts,
    seed=seeds,
)
def test_softmax_values_and_grads(dtype, shape, scale, causal, layout, seed):
    rng = np.random.default_rng(seed)
    x = rand(rng, shape, dtype, layout) * 4
    op, ref = softmax_fns(scale, causal)
    assert_close(op(x), ref(x), dtype, k=shape[-1], label="softmax")
    check_grads(op, ref, [x], ["x"], rng, k=shape[-1])


@pytest.mark.parametrize("causal", [False, True])
def test_softmax_transforms(causal):
    rng = np.random.default_rng(0)
    x = rand(rng, (2, 3, 5, 6))
    op, ref = softmax_fns(0.7, causal)
    check_grads_fd(op, [x], ["x"], rng)
    check_jvp(op, ref, [x], ["x"], rng)
    check_second_order(op, ref, [x], ["x"], 0, rng)
    check_compile(op, [x], rng)
    for axis in (0, 2, 3):
        check_vmap(op, ref, [rand(rng, (2, 3, 5, 6))], [axis])


def test_softmax_masks_causally_with_more_keys_than_queries():
    x = mx.zeros((2, 5))  # 2 queries aligned to the last of 5 keys
    expected = np.array([[0.25, 0.25, 0.25, 0.25, 0], [0.2] * 5])
    assert_close(ops.softmax(x, causal=True), expected, mx.float32)
    # more queries than keys: the first queries see no key at all
    assert_close(ops.softmax(mx.zeros((3, 2)), causal=True), [[0, 0], [1, 0], [0.5, 0.5]], None)


def test_softmax_extremes():
    x = mx.array([[-mx.inf, 0.0, 0.0, -mx.inf], [1e4, 0.0, -1e4, 3.0], [0.0, mx.nan, 0.0, 0.0]])
    out = np.array(ops.softmax(x))
    assert np.allclose(out[0], [0, 0.5, 0.5, 0]) and np.allclose(out[1], [1, 0, 0, 0])
    assert np.isnan(out[2]).all()


def test_softmax_rejects_bad_input():
    check_raises(TypeError, lambda: ops.softmax(mx.zeros((2, 3), mx.int32)), ["x"])
    check_raises(ValueError, lambda: ops.softmax(mx.zeros((3,)), causal=True), ["x"], [(3,)])
    check_raises(ValueError, lambda: ops.softmax(mx.zeros((3,)), scale=float("nan")), ["scale"])


# --------------------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@given(
    rows=st.lists(st.integers(1, 5), min_size=0, max_size=2).map(tuple),
    vocab=st.integers(1, 70),
    layout=layouts,
    seed=seeds,
)
def test_cross_entropy_values_and_grads(dtype, rows, vocab, layout, seed):
    rng = np.random.default_rng(seed)
    logits = rand(rng, rows + (vocab,), dtype, layout) * 8
    targets = mx.array(rng.integers(0, vocab, size=rows), dtype=mx.int32)
    expected = nn.losses.cross_entropy(logits.astype(mx.float32), targets)
    k = vocab
    assert_close(ops.cross_entropy(logits, targets), expected, mx.float32, k=k, rtol=tol(dtype, k))
    check_grads(
        lambda lg: ops.cross_entropy(lg, targets),
        lambda lg: reference.cross_entropy(lg, targets),
        [logits],
        ["logits"],
        rng,
        k=k,
    )


def test_cross_entropy_transforms():
    rng = np.random.default_rng(1)
    logits = rand(rng, (3, 4, 9)) * 3
    targets = mx.array(rng.integers(0, 9, size=(3, 4)))
    op = lambda lg: ops.cross_entropy(lg, targets)  # noqa: E731
    ref = lambda lg: reference.cross_entropy(lg, targets)  # noqa: E731
    check_grads_fd(op, [logits], ["logits"], rng)
    check_jvp(op, ref, [logits], ["logits"], rng)
    check_second_order(op, ref, [logits], ["logits"], 0, rng)
    check_compile(op, [logits], rng)
    for lg_axis, tg_axis in [(0, 0), (2, 1), (0, None), (None, 1)]:
        lg = (
            rand(rng, (4, 9))
            if lg_axis is None
            else mx.stack([rand(rng, (4, 9)) for _ in range(3)], lg_axis)
        )
        tg = mx.array(rng.integers(0, 9, size=(4,) if tg_axis is None else (3, 4)))
        if tg_axis == 1:
            tg = tg.T
        check_vmap(ops.cross_entropy, reference.cross_entropy, [lg, tg], [lg_axis, tg_axis])


def test_cross_entropy_grad_of_logits_hundreds_apart():
    """Most exps underflow and, scaled by a small incoming gradient, would come out
    subnormal: they come out 0, and the gradient is the reference's."""
    rng = np.random.default_rng(7)
    logits = rand(rng, (4, 3000)) * 60
    targets = mx.array(rng.integers(0, 3000, size=(4,)), dtype=mx.int32)
    got = mx.grad(lambda lg: ops.cross_entropy(lg, targets).mean() / 256)(logits)
    expected = mx.grad(lambda lg: reference.cross_entropy(lg, targets).mean() / 256)(logits)
    assert_close(got, expected, mx.float32, k=3000)
    magnitude = np.abs(np.array(got))
    assert not np.any((magnitude > 0) & (magnitude < np.finfo(np.float32).tiny))


@pytest.mark.parametrize("dtype", [mx.int8, mx.uint16, mx.int64])
def test_cross_entropy_takes_any_integer_targets(dtype):
    logits = mx.array([[0.0, 1.0, 2.0]])
    expected = reference.cross_entropy(logits, mx.array([2]))
    assert_close(ops.cross_entropy(logits, mx.array([2], dtype=dtype)), expected, mx.float32)


def test_cross_entropy_out_of_range_targets_give_nan():
    out = ops.cross_entropy(mx.zeros((3, 4)), mx.array([-1, 4, 2]))
    assert np.isnan(np.array(out[:2])).all() and np.isfinite(out[2].item())


def test_cross_entropy_rejects_bad_input():
    lg = mx.zeros((2, 5))
    check_raises(TypeError, lambda: ops.cross_entropy(lg, mx.zeros((2,))), ["targets"])
    check_raises(
        TypeError, lambda: ops.cross_entropy(lg.astype(mx.int32), mx.zeros(2, mx.int32)), ["logits"]
    )
    check_raises(
        ValueError, lambda: ops.cross_entropy(lg, mx.zeros((3,), mx.int32)), ["targets"], [(2,)]
    )


# --------------------------------------------------------------------------- linear_cross_entropy


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@given(
    rows=st.lists(st.integers(1, 6), min_size=0, max_size=2).map(tuple),
    d=st.integers(1, 24),
    vocab=st.integers(1, 70),
    layout=layouts,
    seed=seeds,
)
def test_linear_cross_entropy_values_and_grads(dtype, rows, d, vocab, layout, seed):
    rng = np.random.default_rng(seed)
    x = rand(rng, rows + (d,), dtype, layout) * 2
    weight = rand(rng, (vocab, d), dtype, layout)
    targets = mx.array(rng.integers(0, vocab, size=rows), dtype=mx.int32)
    k = vocab * d
    expected = reference.linear_cross_entropy(x, weight, targets)
    got = ops.linear_cross_entropy(x, weight, targets)
    assert_close(got, expected, mx.float32, k=k, rtol=tol(dtype, k))
    check_grads(
        lambda a, w: ops.linear_cross_entropy(a, w, targets),
        lambda a, w: reference.linear_cross_entropy(a, w, targets),
        [x, weight],
        ["x", "weight"],
        rng,
        k=k,
    )


def test_linear_cross_entropy_transforms():
    rng = np.random.default_rng(3)
    x, weight = rand(rng, (2, 3, 6)), rand(rng, (11, 6))
    targets = mx.array(rng.integers(0, 11, size=(2, 3)))
    op = lambda a, w: ops.linear_cross_entropy(a, w, targets)  # noqa: E731
    ref = lambda a, w: reference.linear_cross_entropy(a, w, targets)  # noqa: E731
    check_grads_fd(op, [x, weight], ["x", "weight"], rng)
    check_jvp(op, ref, [x, weight], ["x", "weight"], rng)
    for i in (0, 1):
        check_second_order(op, ref, [x, weight], ["x", "weight"], i, rng)
    check_compile(op, [x, weight], rng)
    # Per-task hidden states, targets and (for a per-task head) weights.
    xs, ws = rand(rng, (3, 4, 6)), rand(rng, (3, 11, 6))
    ts = mx.array(rng.integers(0, 11, size=(3, 4)))
    cases = {
        (0, None, 0): (xs, ws[0], ts),
        (1, None, 1): (xs.swapaxes(0, 1), ws[0], ts.T),
        (None, None, 0): (xs[0], ws[0], ts),
        (0, 0, 0): (xs, ws, ts),
        (None, 2, None): (xs[0], ws.transpose(1, 2, 0), ts[0]),
    }

    def grads(fn):
        return mx.grad(lambda a, w, t: fn(a, w, t).sum() ** 2, (0, 1))

    for axes, args in cases.items():
        check_vmap(ops.linear_cross_entropy, reference.linear_cross_entropy, args, axes)
        got = mx.vmap(grads(ops.linear_cross_entropy), axes)(*args)
        expected = mx.vmap(grads(reference.linear_cross_entropy), axes)(*args)
        for g, e in zip(got, expected, strict=True):
            assert_close(g, e, mx.float32, k=66)


@pytest.mark.parametrize(
    "rows, vocab, transposed",
    [(83, 50000, False), (84, 50000, False), (257, 50000, True), (4100, 3000, False)],
)
def test_linear_cross_entropy_over_several_blocks(rows, vocab, transposed):
    """Blocks of logits hold at most 2^22 (16 MB): 84 rows of a 50,000 vocabulary take
    two blocks of columns, 257 rows four, and 4,100 rows two blocks of rows. Later
    columns have larger logits, so each row's max grows from block to block: the
    blocks give the values and gradients of one product."""
    rng = np.random.default_rng(rows)
    x = rand(rng, (rows, 8))
    weight = rand(rng, (vocab, 8)) * mx.linspace(0.1, 3.0, vocab)[:, None]
    if transposed:  # stored (d, V), as a tied embedding's transpose may be
        weight = mx.contiguous(weight.T).T
    targets = mx.array(rng.integers(0, vocab, size=(rows,)), dtype=mx.int32)
    got = mx.value_and_grad(lambda a: ops.linear_cross_entropy(a, weight, targets).sum())(x)
    ref = mx.value_and_grad(lambda a: reference.linear_cross_entropy(a, weight, targets).sum())
    for g, e, name in zip(got, ref(x), ("loss", "grad"), strict=True):
        assert_close(g, e, mx.float32, k=rows * 8, label=name)


def test_linear_cross_entropy_of_large_logits():
    """Logits hundreds apart (an untrained head): most exps underflow to 0, and the
    loss and gradient are those of one product."""
    rng = np.random.default_rng(5)
    x, weight = rand(rng, (16, 64)) * 8, rand(rng, (3000, 64))
    targets = mx.array(rng.integers(0, 3000, size=(16,)), dtype=mx.int32)
    got = mx.value_and_grad(lambda a: ops.linear_cross_entropy(a, weight, targets).sum())(x)
    ref = mx.value_and_grad(lambda a: reference.linear_cross_entropy(a, weight, targets).sum())
    for g, e, name in zip(got, ref(x), ("loss", "grad"), strict=True):
        assert_close(g, e, mx.float32, k=64, label=name)


def test_linear_cross_entropy_holds_no_logits():
    """The first-order backward pass is the forward primitive's own output: no product
    of the logits is built, so no (rows, V) array is held."""
    x, weight = mx.ones((4, 8)), mx.ones((20000, 8)) * 0.01
    targets = mx.zeros((4,), mx.int32)
    grad = mx.grad(lambda a: ops.linear_cross_entropy(a, weight, targets).sum())(x)
    mx.eval(grad)
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    grad = mx.grad(lambda a: ops.linear_cross_entropy(a, weight, targets).sum())(x)
    mx.eval(grad)
    assert mx.get_peak_memory() - before < 4 * 20000 * 4  # the logits alone
    unfused = mx.grad(lambda a: reference.linear_cross_entropy(a, weight, targets).sum())(x)
    assert_close(grad, unfused, mx.float32, k=8)


def test_linear_cross_entropy_out_of_range_targets_give_nan():
    out = ops.linear_cross_entropy(mx.ones((3, 2)), mx.ones((4, 2)), mx.array([-1, 4, 2]))
    assert np.isnan(np.array(out[:2])).all() and np.isfinite(out[2].item())


def test_linear_cross_entropy_rejects_bad_input():
    x, w, t = mx.zeros((2, 3)), mx.zeros((5, 3)), mx.zeros((2,), mx.int32)
    lce = ops.linear_cross_entropy
    check_raises(TypeError, lambda: lce(x, w, t.astype(mx.float32)), ["targets"])
    check_raises(TypeError, lambda: lce(x.astype(mx.int32), w, t), ["x"])
    check_raises(TypeError, lambda: lce(x, w.astype(mx.int32), t), ["weight"])
    check_raises(ValueError, lambda: lce(x, mx.zeros((5, 4)), t), ["x"], [(2, 3)])
    check_raises(ValueError, lambda: lce(x, mx.zeros((2, 5, 3)), t), ["weight"])
    check_raises(ValueError, lambda: lce(x, w, mx.zeros((3,), mx.int32)), ["targets"], [(2,)])


# --------------------------------------------------------------------------- sigmoid


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@given(
    shape=st.lists(st.integers(1, 40), min_size=0, max_size=3).map(tuple),
    layout=layouts,
    seed=seeds,
)
def test_sigmoid_values_and_grads(dtype, shape, layout, seed):
    rng = np.random.default_rng(seed)
    x = rand(rng, shape, dtype, layout) * 20
    assert_close(ops.sigmoid(x), reference.sigmoid(x), dtype)
    check_grads(ops.sigmoid, reference.sigmoid, [x], ["x"], rng)


def test_sigmoid_transforms_and_extremes():
    rng = np.random.default_rng(2)
    x = rand(rng, (4, 33)) * 6
    check_grads_fd(ops.sigmoid, [x], ["x"], rng)
    check_jvp(ops.sigmoid, reference.sigmoid, [x], ["x"], rng)
    check_second_order(ops.sigmoid, reference.sigmoid, [x], ["x"], 0, rng)
    check_compile(ops.sigmoid, [x], rng)
    check_vmap(ops.sigmoid, reference.sigmoid, [rand(rng, (4, 3, 5))], [1])
    out = np.array(ops.sigmoid(mx.array([-mx.inf, mx.inf, -200.0, 200.0, 0.0, mx.nan])))
    assert np.array_equal(out[:5], [0, 1, 0, 1, 0.5]) and np.isnan(out[5])
    for bad in BAD_DTYPES:
        check_raises(TypeError, lambda bad=bad: ops.sigmoid(mx.zeros((2,), bad)), ["x"])


# --------------------------------------------------------------------------- attention


@st.composite
def attention_shapes(draw):
    kv = draw(st.integers(1, 3))
    return (
        draw(st.integers(1, 3)),  # B
        kv * draw(st.integers(1, 3)),  # heads
        kv,
        draw(st.integers(1, 6)),  # L
        draw(st.integers(0, 3)),  # S - L
        draw(st.integers(1, 9)),  # D
    )


def attention_args(rng, shape, dtype=mx.float32):
    B, H, KV, L, extra, D = shape
    S = L + extra
    return [
        rand(rng, (B, H, L, D), dtype),
        rand(rng, (B, KV, S, D), dtype),
        rand(rng, (B, KV, S, D), dtype),
    ]


def attention_fns(mask):
    return (
        lambda q, k, v: ops.attention(q, k, v, 0.4, mask),
        lambda q, k, v: reference.attention(q, k, v, 0.4, mask),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@given(
    shape=attention_shapes(), mask_kind=st.sampled_from([None, "causal", "bool", "add"]), seed=seeds
)
def test_attention_against_mlx_sdpa(dtype, shape, mask_kind, seed):
    rng = np.random.default_rng(seed)
    q, k, v = attention_args(rng, shape, dtype)
    L, S = q.shape[2], k.shape[2]
    mask = mask_kind
    if mask_kind == "bool":
        mask = mx.array(rng.random((L, S)) < 0.7) | (mx.arange(S) == 0)
    elif mask_kind == "add":
        mask = rand(rng, (L, S), dtype)
    op, ref = attention_fns(mask)
    k_len = S * shape[-1]
    assert_close(op(q, k, v), ref(q, k, v), dtype, k=k_len, label="attention")
    check_grads(op, ref, [q, k, v], ["queries", "keys", "values"], rng, k=k_len)


def test_attention_transforms():
    rng = np.random.default_rng(3)
    args = attention_args(rng, (2, 4, 2, 3, 1, 5))
    names = ["queries", "keys", "values"]
    op, ref = attention_fns("causal")
    check_grads_fd(op, args, names, rng)
    check_jvp(op, ref, args, names, rng)
    check_second_order(op, ref, args, names, 0, rng)
    check_compile(op, args, rng)
    for in_axes in [(0, None, None), (0, 0, 0), (None, 1, 1)]:
        batched_args = [
            rand(rng, a.shape[:ax] + (3,) + a.shape[ax:]) if ax is not None else a
            for a, ax in zip(args, in_axes, strict=True)
        ]
        check_vmap(op, ref, batched_args, list(in_axes))


def test_attention_rejects_bad_input():
    q, kv = mx.zeros((1, 3, 4, 8)), mx.zeros((1, 2, 4, 8))
    check_raises(ValueError, lambda: ops.attention(q, kv, kv, 0.1), ["n_heads", "n_kv_heads"])
    q = mx.zeros((1, 4, 4, 8))
    check_raises(ValueError, lambda: ops.attention(q[0], kv, kv, 0.1), ["queries"])
    check_raises(ValueError, lambda: ops.attention(q, kv[..., :4], kv, 0.1), ["keys"])
    check_raises(ValueError, lambda: ops.attention(q, kv, kv, 0.1, mask="window"), ["mask"])
    check_raises(ValueError, lambda: ops.attention(q, kv, kv, float("inf")), ["scale"])


# --------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@given(
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple),
    w_dtype=st.sampled_from(DTYPES),
    layout=layouts,
    seed=seeds,
)
def test_rms_norm_values_and_grads(dtype, shape, w_dtype, layout, seed):
    rng = np.random.default_rng(seed)
    x = rand(rng, shape, dtype, layout) * 3
    w = rand(rng, shape[-1:], w_dtype)
    out_dtype = mx.result_type(x, w)
    expected = mx.fast.rms_norm(x, w, 1e-5)
    assert_close(ops.rms_norm(x, w, 1e-5), expected, out_dtype, k=shape[-1])
    check_grads(
        lambda x, w: ops.rms_norm(x, w, 1e-5),
        lambda x, w: reference.rms_norm(x, w, 1e-5),
        [x, w],
        ["x", "weight"],
        rng,
        k=math.prod(shape),
    )


def test_rms_norm_transforms():
    rng = np.random.default_rng(4)
    args = [rand(rng, (3, 4, 10)), rand(rng, (10,))]
    op = lambda x, w: ops.rms_norm(x, w, 1e-3)  # noqa: E731
    ref = lambda x, w: reference.rms_norm(x, w, 1e-3)  # noqa: E731
    check_grads_fd(op, args, ["x", "weight"], rng)
    check_jvp(op, ref, args, ["x", "weight"], rng)
    check_second_order(op, ref, args, ["x", "weight"], 0, rng)
    check_second_order(op, ref, args, ["x", "weight"], 1, rng)
    check_compile(op, args, rng)
    for in_axes in [(0, None), (2, None), (1, 0), (None, 0)]:
        x = (
            rand(rng, (3, 4, 10))
            if in_axes[0] is None
            else rand(rng, (3, 4, 10)[: in_axes[0]] + (5,) + (3, 4, 10)[in_axes[0] :])
        )
        w = rand(rng, (10,)) if in_axes[1] is None else rand(rng, (5, 10))
        check_vmap(op, ref, [x, w], list(in_axes), k=10)
        # the gradients under vmap: the weight's summed per mapped entry
        check_vmap_grads(op, ref, [x, w], in_axes, k=40)


def test_rms_norm_rejects_bad_input():
    x = mx.zeros((2, 5))
    check_raises(ValueError, lambda: ops.rms_norm(x, mx.ones((4,)), 1e-5), ["weight"], [(4,)])
    check_raises(TypeError, lambda: ops.rms_norm(x.astype(mx.int32), mx.ones((5,)), 1e-5), ["x"])
    check_raises(ValueError, lambda: ops.rms_norm(x, mx.ones((5,)), float("nan")), ["eps"])


# --------------------------------------------------------------------------- RoPE


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@given(
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=2).map(tuple),
    length=st.integers(1, 9),
    half=st.integers(1, 6),
    extra=st.integers(0, 3),
    traditional=st.booleans(),
    offset=st.integers(0, 50),
    use_freqs=st.booleans(),
    seed=seeds,
)
def test_rope_against_mlx(dtype, lead, length, half, extra, traditional, offset, use_freqs, seed):
    rng = np.random.default_rng(seed)
    dims = 2 * half
    x = rand(rng, lead + (length, dims + extra), dtype)
    kw = dict(traditional=traditional, scale=0.7, offset=offset)
    if use_freqs:
        kw.update(base=None, freqs=mx.array(rng.uniform(1, 1000, size=half).astype(np.float32)))
    else:
        kw.update(base=10000.0)
    expected = mx.fast.rope(x, dims, **kw)
    assert_close(ops.rope(x, dims, **kw), expected, dtype, k=4)
    assert_close(reference.rope(x, dims, **kw), expected, dtype, k=4, label="reference")
    check_grads(
        lambda x: ops.rope(x, dims, **kw), lambda x: reference.rope(x, dims, **kw), [x], ["x"], rng
    )


def test_rope_transforms():
    rng = np.random.default_rng(5)
    x = rand(rng, (2, 3, 5, 8))
    kw = dict(traditional=False, base=100.0, scale=1.0, offset=2)
    op = lambda x: ops.rope(x, 6, **kw)  # noqa: E731
    ref = lambda x: reference.rope(x, 6, **kw)  # noqa: E731
    check_grads_fd(op, [x], ["x"], rng)
    check_jvp(op, ref, [x], ["x"], rng)
    check_second_order(op, ref, [x], ["x"], 0, rng)
    check_compile(op, [x], rng)
    for axis in (0, 1):
        check_vmap(op, ref, [rand(rng, (4, 3, 5, 8) if axis == 0 else (2, 4, 5, 8))], [axis])


def test_rope_rejects_bad_input():
    x = mx.zeros((2, 3, 8))
    kw = dict(traditional=False, scale=1.0, offset=0)
    check_raises(ValueError, lambda: ops.rope(x, 5, base=1e4, **kw), ["dims"])
    check_raises(ValueError, lambda: ops.rope(x, 10, base=1e4, **kw), ["dims"])
    check_raises(ValueError, lambda: ops.rope(x, 8, base=None, **kw), ["base", "freqs"])
    check_raises(
        ValueError, lambda: ops.rope(x, 8, base=None, freqs=mx.ones((3,)), **kw), ["freqs"], [(3,)]
    )
    check_raises(
        TypeError,
        lambda: ops.rope(x, 8, base=1e4, traditional=False, scale=1.0, offset=mx.array(1)),
        ["offset"],
    )


# --------------------------------------------------------------------------- SwiGLU


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@given(
    shape=st.lists(st.integers(1, 40), min_size=0, max_size=3).map(tuple),
    up_dtype=st.sampled_from(DTYPES),
    layout=layouts,
    seed=seeds,
)
def test_swiglu_values_and_grads(dtype, shape, up_dtype, layout, seed):
    rng = np.random.default_rng(seed)
    gate = rand(rng, shape, dtype, layout) * 6
    up = rand(rng, shape, up_dtype)
    assert_close(ops.swiglu(gate, up), reference.swiglu(gate, up), mx.result_type(gate, up))
    check_grads(ops.swiglu, reference.swiglu, [gate, up], ["gate", "up"], rng)


def test_swiglu_transforms():
    rng = np.random.default_rng(6)
    args = [rand(rng, (3, 17)) * 4, rand(rng, (3, 17))]
    names = ["gate", "up"]
    check_grads_fd(ops.swiglu, args, names, rng)
    check_jvp(ops.swiglu, reference.swiglu, args, names, rng)
    for inner in (0, 1):
        check_second_order(ops.swiglu, reference.swiglu, args, names, inner, rng)
    check_compile(ops.swiglu, args, rng)
    for in_axes in [(0, 0), (1, None), (None, 0)]:
        batched_args = [
            rand(rng, (3, 17)[:ax] + (4,) + (3, 17)[ax:]) if ax is not None else a
            for a, ax in zip(args, in_axes, strict=True)
        ]
        check_vmap(ops.swiglu, reference.swiglu, batched_args, list(in_axes))
        check_vmap_grads(ops.swiglu, reference.swiglu, batched_args, in_axes)


def test_swiglu_rejects_bad_input():
    check_raises(ValueError, lambda: ops.swiglu(mx.zeros((2, 3)), mx.zeros((3,))), ["gate", "up"])
    check_raises(TypeError, lambda: ops.swiglu(mx.zeros((2,), mx.int32), mx.zeros((2,))), ["gate"])
