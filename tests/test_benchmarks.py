"""Every benchmark body runs once, on tiny sizes, in the normal test run: the
pytest-benchmark tests, every asv benchmark and parameter combination, and asv's
own discovery (``asv check``)."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from metapeft.bench import peers
from metapeft.learners import ALGORITHMS

ROOT = Path(__file__).resolve().parent.parent
TINY = {**os.environ, "METAPEFT_BENCH_SIZE": "tiny"}


def _run(args, env=TINY, timeout=900):
    result = subprocess.run(
        args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    return result, result.stdout[-3000:] + result.stderr[-3000:]


def test_every_pytest_benchmark_runs_on_tiny_sizes():
    result, tail = _run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/benchmarks",
            "--benchmark-disable",
            "-o",
            "addopts=",
            "-p",
            "no:cacheprovider",
            "-q",
        ]
    )
    assert result.returncode == 0, tail
    last = result.stdout.splitlines()[-1]
    assert " passed" in last and "skipped" not in last and "error" not in last, tail


# Runs each asv benchmark the way asv does (setup, then the benchmark) for every
# parameter combination; prints one line per run; a NotImplementedError from setup is
# asv's way of skipping a combination and is reported as such.
ASV_BODIES = textwrap.dedent(
    """
    import importlib, inspect, itertools, pkgutil, sys
    sys.path.insert(0, ".")
    import benchmarks
    for info in pkgutil.iter_modules(benchmarks.__path__):
        module = importlib.import_module(f"benchmarks.{info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__ or name.startswith("_"):
                continue
            methods = [m for m in dir(cls) if m.startswith(("time_", "track_"))]
            for combo in itertools.product(*cls.params):
                bench = cls()
                try:
                    bench.setup(*combo)
                except NotImplementedError:
                    print("SKIP", name, combo)
                    continue
                for m in methods:
                    value = getattr(bench, m)(*combo)
                    if m.startswith("track_"):
                        assert isinstance(value, (int, float)) and value > 0, (name, m, value)
                    print("RAN", f"{name}.{m}", combo)
    """
)


def test_every_asv_benchmark_runs_on_tiny_sizes():
    result, tail = _run([sys.executable, "-c", ASV_BODIES])
    assert result.returncode == 0, tail
    lines = result.stdout.splitlines()
    ran = {line.split()[1] for line in lines if line.startswith("RAN")}
    skipped = [line for line in lines if line.startswith("SKIP")]
    expected = {
        "Linear.time_forward",
        "Linear.time_forward_backward",
        "LoRALinear.time_forward",
        "LoRALinear.time_forward_backward",
        "TaskSGD.time_task_sgd",
        "ReptileUpdate.time_reptile_update",
        "LinearCrossEntropy.time_loss_and_grad",
        "LinearCrossEntropy.track_peak_memory",
        "SinusoidMetaStep.time_meta_step",
        "SinusoidMetaStep.track_peak_memory",
        "SinusoidMetaStep.track_meta_steps_per_second",
        "LoRAMetaStep.time_meta_step",
        "LoRAMetaStep.track_peak_memory",
        "LoRAMetaStep.track_meta_steps_per_second",
        "LMMetaStep.time_meta_step",
        "LMMetaStep.track_peak_memory",
        "LMMetaStep.track_meta_steps_per_second",
        "LoRAStep.time_lora_step",
        "FOMAMLMetaStep.time_meta_step",
    }
    assert ran == expected, tail
    # The plain-MLX baseline of non-MAML algorithms is skipped (2 sizes each), and the
    # torch twins of the real-model steps where torch is missing.
    mlx = [s for s in skipped if "'mlx'" in s]
    assert len(mlx) == 2 * (len(ALGORITHMS) - 1) and all("'maml'" not in s for s in mlx)
    torch = [s for s in skipped if "'torch'" in s]
    assert len(torch) == (0 if "torch" in peers.installed() else 2)
    assert len(skipped) == len(mlx) + len(torch), tail


@pytest.mark.skipif(shutil.which("asv") is None, reason="asv is not installed")
def test_asv_check_discovers_every_benchmark():
    result, tail = _run(["asv", "check", "-E", f"existing:{sys.executable}"], timeout=300)
    assert result.returncode == 0, tail
    assert "Error" not in result.stdout + result.stderr, tail
