"""GFLOP/s of ``ops.linear`` at the product sizes of a small transformer's step, on each
BLAS metapeft can use here (OpenBLAS, and MKL when installed), each in its own process.

Usage:
    python experiments/blas_rates.py --out results/<machine>/blas_rates
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import write_results

# (rows, d_in, d_out): SmolLM2-135M's projections at 256 tokens, 4x as many rows,
# its tied output layer, and a large square product.
SIZES = (
    "256x576x192,256x576x576,256x576x1536,256x1536x576,1024x576x576,256x576x49152,2048x2048x2048"
)


def measure(sizes: str) -> dict:
    """In this process: the BLAS in use and the median GFLOP/s of each size."""
    import mlx.core as mx

    from metapeft import blas, ops

    rates = {}
    for m, k, n in (map(int, s.split("x")) for s in sizes.split(",")):
        x, w = mx.random.normal((m, k)), mx.random.normal((n, k))
        mx.eval(x, w)
        times = []
        for _ in range(25):
            start = time.perf_counter()
            mx.eval(ops.linear(x, w))
            times.append(time.perf_counter() - start)
        rates[f"{m}x{k}x{n}"] = 2 * m * k * n / sorted(times[3:])[11] / 1e9
    return {"blas": blas.name(), "gflops": rates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=SIZES, help="rows x d_in x d_out, comma-separated")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.sizes)))
        return
    rows = []
    for choice in ("openblas", "auto"):
        env = {**os.environ, "METAPEFT_BLAS": choice}
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--sizes", args.sizes],
            capture_output=True,
            text=True,
            env=env,
        )
        if out.returncode != 0:
            sys.exit(out.stderr)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        if not any(r["blas"] == row["blas"] for r in rows):
            rows.append(row)
    names = [r["blas"] for r in rows]
    table = [
        "`ops.linear` GFLOP/s (float32, medians of 22), one process per BLAS.",
        "",
        "| rows x d_in x d_out | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for size in rows[0]["gflops"]:
        table.append(f"| {size} | " + " | ".join(f"{r['gflops'][size]:.0f}" for r in rows) + " |")
    write_results(args.out, args, rows, table)


if __name__ == "__main__":
    main()
