"""Problem sizes of the benchmarks: the full ones, or tiny ones when
``METAPEFT_BENCH_SIZE=tiny``, with which the normal test run checks that every
benchmark body runs (``tests/test_benchmarks.py``)."""

import os

TINY = os.environ.get("METAPEFT_BENCH_SIZE") == "tiny"


def size(full, tiny):
    """``tiny`` when running tiny benchmarks, else ``full``."""
    return tiny if TINY else full
