"""The Metal kernels, checked where Metal does not run: the ``.metal`` sources compiled as
C++ against stand-ins for the Metal language (``tests/metal_stub/``), each instantiation
run on the CPU and compared with the CPU primitive it mirrors, over every dtype
combination, strided and broadcast operands. (The Metal compiler itself has not run
them: see the README.)"""

from __future__ import annotations

import ctypes
import itertools
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from metapeft import ops

ROOT = Path(__file__).resolve().parent.parent
NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}
DTYPES = list(NAMES)


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("no g++ to compile the Metal sources as C++")
    lib = tmp_path_factory.mktemp("metal-stub") / "kernels.so"
    subprocess.run(
        ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-Wno-attributes"]
        + ["-I", str(ROOT / "tests" / "metal_stub"), "-I", str(ROOT / "csrc")]
        + ["-x", "c++", str(ROOT / "tests" / "metal_stub" / "harness.cpp"), "-o", str(lib)],
        check=True,
        timeout=300,
    )
    return ctypes.CDLL(str(lib))


def raw(a: mx.array) -> np.ndarray:
    """The storage of a dense array as numpy (bfloat16 as its uint16 bits)."""
    return np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)


class Args:
    """A kernel's arguments as ctypes values, and the array of pointers to them."""

    def __init__(self) -> None:
        self.keep: list = []

    def add(self, value) -> None:
        self.keep.append(value)

    def pointers(self):
        return (ctypes.c_void_p * len(self.keep))(
            *(ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in self.keep)
        )


def buffer(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


def longs(values) -> tuple[np.ndarray, ctypes.c_void_p]:
    arr = np.ascontiguousarray(values, dtype=np.int64)
    return arr, buffer(arr)


def run(kernels, name: str, args: Args, size: int) -> None:
    assert kernels.run_kernel(name.encode(), args.pointers(), ctypes.c_int64(size)) == 0, name


def assert_same(got: np.ndarray, expected: mx.array) -> None:
    want = raw(expected)
    if expected.dtype == mx.float32:  # the CPU kernel may fuse the multiply-add
        np.testing.assert_allclose(got.view(np.float32), want, rtol=2e-6, atol=1e-7)
    else:
        ulps = np.abs(got.view(np.int16).astype(np.int32) - want.view(np.int16).astype(np.int32))
        assert ulps.max() <= 1, (got, want)


@pytest.mark.parametrize(("pd", "gd", "ld"), list(itertools.product(DTYPES, repeat=3)))
def test_task_sgd_kernel_matches_the_cpu(kernels, pd, gd, ld):
    rng = np.random.default_rng(0)
    p = mx.array(rng.standard_normal((3, 5)).astype(np.float32)).astype(pd)
    g_t = mx.array(rng.standard_normal((5, 3)).astype(np.float32)).astype(gd)
    lr = mx.array(rng.uniform(0.1, 1.0, (5,)).astype(np.float32)).astype(ld)
    expected = ops.task_sgd({"w": p}, {"w": g_t.T}, {"w": lr}, stream=mx.cpu)["w"]
    p_raw, g_raw, lr_raw = raw(p), raw(g_t), raw(lr)  # g is read transposed: strides (1, 3)
    out = np.zeros(15, dtype=raw(expected).dtype)
    shape = np.array([3, 5], dtype=np.int32)
    args = Args()
    for a in (p_raw, g_raw, lr_raw, out):
        args.add(buffer(a))
    args.add(buffer(shape))
    strides = [longs([5, 1]), longs([1, 3]), longs([0, 1])]
    for _storage, ptr in strides:  # the arrays stay alive in `strides`
        args.add(ptr)
    args.add(ctypes.c_int(2))
    args.add(ctypes.c_int64(15))
    run(kernels, f"metapeft_task_sgd_{NAMES[pd]}_{NAMES[gd]}_{NAMES[ld]}", args, 15)
    assert_same(out.reshape(3, 5), expected)


@pytest.mark.parametrize(("pd", "ad", "ed"), list(itertools.product(DTYPES, repeat=3)))
def test_reptile_update_kernel_matches_the_cpu(kernels, pd, ad, ed):
    rng = np.random.default_rng(1)
    p = mx.array(rng.standard_normal((4, 3)).astype(np.float32)).astype(pd)
    # The adapted leaves stored task-last: (4, 3, T=2) read as (T, 4, 3).
    a_store = mx.array(rng.standard_normal((4, 3, 2)).astype(np.float32)).astype(ad)
    eps = mx.array(0.3).astype(ed)
    expected = ops.reptile_update({"w": p}, {"w": a_store.transpose(2, 0, 1)}, eps, stream=mx.cpu)[
        "w"
    ]
    p_raw, a_raw, e_raw = raw(p), raw(a_store), raw(eps).reshape(1)
    out = np.zeros(12, dtype=raw(expected).dtype)
    shape = np.array([4, 3], dtype=np.int32)
    args = Args()
    for a in (p_raw, a_raw, e_raw, out):
        args.add(buffer(a))
    args.add(buffer(shape))
    p_strides, a_strides = longs([3, 1]), longs([6, 2])
    args.add(p_strides[1])
    args.add(a_strides[1])
    args.add(ctypes.c_int(2))
    args.add(ctypes.c_int64(12))
    args.add(ctypes.c_int64(2))  # tasks
    args.add(ctypes.c_int64(1))  # the task axis' stride
    run(kernels, f"metapeft_reptile_update_{NAMES[pd]}_{NAMES[ad]}_{NAMES[ed]}", args, 12)
    assert_same(out.reshape(4, 3), expected)


def test_every_dtype_combination_is_instantiated(kernels):
    assert kernels.kernel_count() == 2 * 27
    assert kernels.run_kernel(b"metapeft_task_sgd_float64_float32_float32", None, 0) == 1
