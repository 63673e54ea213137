"""Loaded first by every pytest run from the repository root.

numpy and metapeft each load an OpenBLAS; two thread pools whose idle workers
spin slow each other down about 2x, so idle workers give up their core quickly.
This must be set before either library is imported.
"""

import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
