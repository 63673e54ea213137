"""Which BLAS the kernels' products run on.

On Linux the extension is linked with OpenBLAS (the ``scipy-openblas32`` wheel). When
Intel's ``mkl`` package is installed (``pip install -e ".[mkl]"``, x86_64 Linux), its
sgemm is used instead, sequentially, with the kernels sharing large products out among
their own worker threads: at a small transformer layer's sizes it ran 200-360 GFLOP/s
on a 2-core Xeon against OpenBLAS's 110-280 (``experiments/blas_rates.py``).
``METAPEFT_BLAS=openblas`` keeps OpenBLAS; ``METAPEFT_BLAS=mkl`` makes a missing MKL an
error. On macOS the kernels use Accelerate.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

from metapeft import _ext

__all__ = ["name", "select"]

CHOICES = ("auto", "mkl", "openblas")


def mkl_library() -> Path | None:
    """The installed ``mkl`` package's ``libmkl_rt.so.*``, or None."""
    try:
        files = importlib.metadata.files("mkl") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name.startswith("libmkl_rt.so"):
            path = Path(f.locate())
            return path if path.is_file() else None
    return None


def select(choice: str | None = None) -> str:
    """Picks the BLAS as ``choice`` (default ``$METAPEFT_BLAS`` or ``auto``) says and
    returns its name. Call it before the first product: it sets a process-wide switch.

    Raises:
        ValueError: If ``choice`` is not one of ``auto``, ``mkl``, ``openblas``.
        RuntimeError: If ``mkl`` is asked for and cannot be loaded.
    """
    choice = choice or os.environ.get("METAPEFT_BLAS", "auto")
    if choice not in CHOICES:
        raise ValueError(f"METAPEFT_BLAS must be one of {list(CHOICES)}, got {choice!r}")
    if platform.system() == "Darwin" or choice == "openblas":
        return name()
    library = mkl_library()
    if library is not None and _ext.use_mkl(str(library)):
        return name()
    if choice == "mkl":
        where = library or "no libmkl_rt.so in an installed mkl package (pip install mkl)"
        raise RuntimeError(f"METAPEFT_BLAS=mkl but MKL cannot be loaded: {where}")
    return name()


def name() -> str:
    """``MKL``, ``OpenBLAS`` or ``Accelerate``."""
    return _ext.blas_name()
