"""Loaded first by every pytest run from the repository root.

numpy and metapeft each load an OpenBLAS; two thread pools whose idle workers
spin slow each other down about 2x, so idle workers give up their core quickly.
metapeft sets the same default when imported (see ``metapeft/__init__.py``); it
is set here too because a test module may import numpy before metapeft.
"""

import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
