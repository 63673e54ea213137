"""metapeft.blas: the products run on MKL when it is installed (x86_64 Linux) and on
OpenBLAS otherwise or when asked; both give the reference's numbers."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from metapeft import blas, ops

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = textwrap.dedent(
    """
    import sys
    import mlx.core as mx, numpy as np
    from metapeft import blas, ops
    rng = np.random.default_rng(0)
    x, w = (mx.array(rng.standard_normal(s).astype(np.float32)) for s in ((300, 700), (500, 700)))
    np.save(sys.argv[1], np.array(ops.linear(x, w)))
    print(blas.name())
    """
)


def run_product(tmp_path, choice):
    out = tmp_path / f"{choice}.npy"
    env = {**os.environ, "METAPEFT_BLAS": choice}
    result = subprocess.run(
        [sys.executable, "-c", PRODUCT, str(out)], capture_output=True, text=True, env=env
    )
    return result, out


def test_openblas_on_request_and_the_same_numbers_either_way(tmp_path):
    result, out = run_product(tmp_path, "openblas")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in ("OpenBLAS", "Accelerate")
    auto, auto_out = run_product(tmp_path, "auto")
    assert auto.returncode == 0, auto.stderr
    assert auto.stdout.strip() == blas.name()
    np.testing.assert_allclose(np.load(auto_out), np.load(out), rtol=1e-4, atol=1e-3)


def test_a_bad_choice_is_a_clear_error(tmp_path, monkeypatch):
    result, _ = run_product(tmp_path, "cublas")
    assert result.returncode != 0 and "METAPEFT_BLAS must be one of" in result.stderr
    if sys.platform != "darwin":
        monkeypatch.setattr(blas, "mkl_library", lambda: None)
        with pytest.raises(RuntimeError, match="METAPEFT_BLAS=mkl but MKL cannot be loaded"):
            blas.select("mkl")


@pytest.mark.skipif(blas.name() != "MKL", reason="the rest of the run already uses OpenBLAS")
def test_the_primitives_pass_their_tests_on_openblas_too():
    env = {**os.environ, "METAPEFT_BLAS": "openblas"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         "tests/test_linear.py", "tests/test_lora_linear.py", "tests/test_rowwise_ops.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout.splitlines()[-1]


@pytest.mark.parametrize("rows, cols", [(64, 999), (999, 64)])
def test_large_products_are_shared_among_threads(rows, cols):
    """Products large enough to be split across the workers (by columns when wide, by
    rows when tall) give numpy's numbers, with a transposed weight too."""
    rng = np.random.default_rng(1)
    x = mx.array(rng.standard_normal((rows, 1000)).astype(np.float32))
    w = mx.array(rng.standard_normal((cols, 1000)).astype(np.float32))
    expected = np.array(x) @ np.array(w).T
    np.testing.assert_allclose(np.array(ops.linear(x, w)), expected, rtol=1e-4, atol=1e-3)
    w_t = mx.array(np.ascontiguousarray(np.array(w).T))  # (1000, cols), read transposed
    got = ops.linear(x, mx.swapaxes(w_t, 0, 1))
    np.testing.assert_allclose(np.array(got), expected, rtol=1e-4, atol=1e-3)
