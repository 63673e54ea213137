"""What machine a measurement was made on: chip, cores, OS, MLX backend, BLAS."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from functools import cache
from pathlib import Path

import mlx.core as mx

import metapeft
from metapeft import blas


@cache
def chip() -> str:
    """The CPU or Apple chip name (sysctl on macOS, /proc/cpuinfo on Linux)."""
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True
            )
            if out.stdout.strip():
                return out.stdout.strip()
        except OSError:
            pass
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M)
        if match:
            return match.group(1).strip()
    return platform.processor() or platform.machine()


def info() -> dict[str, str | int]:
    """A stamp for recorded results."""
    return {
        "chip": chip(),
        "cores": os.cpu_count() or 0,
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "backend": "Metal" if mx.metal.is_available() else "CPU",
        "device": str(mx.default_device()),
        "blas": blas.name(),
        "metapeft": metapeft.__version__,
        "commit": commit(),
    }


@cache
def commit() -> str:
    """The git commit metapeft was installed from (short hash), or ``unknown``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(metapeft.__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def machine_id() -> str:
    """A short folder name for this machine's results, e.g. ``linux-x86_64-amd-epyc-2c``."""
    name = re.sub(r"[^a-z0-9]+", "-", chip().lower()).strip("-")
    return f"{platform.system().lower()}-{platform.machine()}-{name}-{os.cpu_count()}c"
