"""The fused updates' CPU kernels: chunks shared among worker threads, and in-place updates."""

import shutil
import subprocess
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import assert_close, rand
from metapeft import ops
from metapeft import reference as ref

# Big enough to be split into many chunks among the threads.
BIG = (6, 70001)


def big_pair(seed):
    rng = np.random.default_rng(seed)
    return rand(rng, BIG, mx.float32), rand(rng, BIG, mx.float32)


@pytest.mark.parametrize("lr_kind", ["float", "shared"])
def test_task_sgd_in_place(lr_kind):
    """A parameter no one else holds lends its buffer to the result: values are unchanged."""
    p, g = big_pair(0)
    lr = 0.3 if lr_kind == "float" else mx.abs(rand(np.random.default_rng(1), BIG[1:], mx.float32))
    expected = ref.task_sgd(p, g, lr)
    mx.eval(p, g, lr, expected)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    out = ops.task_sgd({"w": p + 1}, {"w": g}, lr)["w"]  # p + 1 is held by the update alone
    mx.eval(out)
    # In place, the update allocates nothing beyond p + 1; a separate result would double that.
    assert mx.get_peak_memory() - base < 1.5 * p.nbytes
    assert_close(out, expected + 1, mx.float32)


def test_reptile_update_in_place():
    meta, _ = big_pair(2)
    meta = meta[0]
    adapted, _ = big_pair(3)
    expected = ref.reptile_update(meta + 1, adapted, 0.4)
    mx.eval(meta, adapted, expected)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    out = ops.reptile_update({"w": meta + 1}, {"w": adapted}, 0.4)["w"]
    mx.eval(out)
    assert mx.get_peak_memory() - base < 1.5 * meta.nbytes
    assert_close(out, expected, mx.float32)


def test_concurrent_streams():
    """Updates running at once on two streams share the workers and stay exact."""
    cases = []
    for seed in range(2):
        p, g = big_pair(10 + seed)
        meta = p[0] * 0.5
        mx.eval(meta)
        cases.append((p, g, meta))
    expected = [(ref.task_sgd(p, g, 0.1), ref.reptile_update(meta, p, 0.2)) for p, g, meta in cases]
    mx.eval(expected)
    errors = []

    def worker(i):
        p, g, meta = cases[i]
        stream = mx.new_stream(mx.cpu)
        try:
            for _ in range(20):
                sgd = ops.task_sgd([p], [g], 0.1, stream=stream)[0]
                rep = ops.reptile_update([meta], [p], 0.2, stream=stream)[0]
                mx.eval(sgd, rep)
                assert_close(sgd, expected[i][0], mx.float32)
                assert_close(rep, expected[i][1], mx.float32)
        except Exception as e:  # noqa: BLE001  (reported by the main thread)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "an update on one of two streams hung"
    assert not errors, errors


def test_the_worker_pool_under_thread_sanitizer(tmp_path):
    """Callers on four threads post jobs at once: under ThreadSanitizer the pool shows no
    data race, and every chunk runs exactly once."""
    if shutil.which("g++") is None:
        pytest.skip("no g++ to build the stress test")
    root = Path(__file__).resolve().parent.parent
    exe = tmp_path / "worker_pool_stress"
    build = subprocess.run(
        ["g++", "-std=c++20", "-O1", "-g", "-fsanitize=thread", "-I", str(root / "csrc")]
        + [str(root / "tests" / "cpp" / "worker_pool_stress.cpp")]
        + [str(root / "csrc" / "workers.cpp")]
        + ["-o", str(exe), "-lpthread"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if build.returncode != 0 and "tsan" in build.stderr:
        pytest.skip(f"no ThreadSanitizer runtime: {build.stderr.strip()[:200]}")
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert "ThreadSanitizer" not in run.stderr, run.stderr
    assert run.returncode == 0 and "other than once: 0" in run.stdout, run.stdout + run.stderr
