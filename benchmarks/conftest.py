"""pytest-benchmark set-up: stamp every result with the machine it was measured on."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import mlx.core as mx

import metapeft


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pytest_benchmark_update_machine_info(config, machine_info):  # noqa: ARG001
    machine_info["mlx_version"] = mx.__version__
    machine_info["mlx_device"] = str(mx.default_device())
    machine_info["blas"] = "Accelerate" if platform.system() == "Darwin" else "OpenBLAS"
    machine_info["metapeft_version"] = metapeft.__version__
    machine_info["metapeft_commit"] = _commit()
