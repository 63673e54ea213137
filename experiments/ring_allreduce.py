"""Latency and bandwidth of ``mx.distributed.all_sum`` on the ring backend over loopback.

Run under the launcher; rank 0 prints the table and, with ``--out``, writes
``OUT.json`` and ``OUT.md``:

    mlx.launch -n 2 --backend ring -- python experiments/ring_allreduce.py \\
        --out results/<machine>/ring_allreduce_2

Each size is summed ``--repeats`` times after a warm-up; the table gives the median and
the fastest time.
The fit ``t = latency + bytes / bandwidth`` over the sizes (least squares on the
medians) is what a cost model of a meta-step's all-reduce uses.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from metapeft import machine

SIZES = [4, 64, 1024, 16 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]


def timed_sum(x: mx.array, repeats: int) -> tuple[float, float]:
    """Median and fastest time of one ``all_sum`` of ``x``."""
    times = []
    for i in range(repeats + 2):
        tic = time.perf_counter()
        mx.eval(mx.distributed.all_sum(x, stream=mx.cpu))
        if i >= 2:
            times.append(time.perf_counter() - tic)
    return float(np.median(times)), float(np.min(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    world = mx.distributed.init(strict=True)
    rows = []
    for size in SIZES:
        x = mx.ones((size // 4,), dtype=mx.float32)
        seconds, fastest = timed_sum(
            x, args.repeats if size < (16 << 20) else max(args.repeats // 4, 3)
        )
        rows.append(
            {
                "bytes": size,
                "seconds": seconds,
                "fastest": fastest,
                "GB_per_s": size / seconds / 1e9,
            }
        )
    if world.rank() != 0:
        return
    sizes = np.array([r["bytes"] for r in rows], dtype=float)
    seconds = np.array([r["seconds"] for r in rows])
    slope, latency = np.polyfit(sizes, seconds, 1)
    fit = {"latency_s": float(latency), "bandwidth_GB_per_s": float(1 / slope / 1e9)}
    table = [
        f"all_sum of float32 over {world.size()} ranks (ring backend, loopback), median of "
        f"{args.repeats} after 2 warm-ups",
        "",
        "| bytes | median | fastest | bandwidth at the median |",
        "|---:|---:|---:|---:|",
    ]
    table += [
        f"| {r['bytes']:,} | {r['seconds'] * 1e6:.0f} us | {r['fastest'] * 1e6:.0f} us | "
        f"{r['GB_per_s']:.3f} GB/s |"
        for r in rows
    ]
    table += [
        "",
        f"Fit t = latency + bytes / bandwidth: latency {fit['latency_s'] * 1e6:.0f} us, "
        f"bandwidth {fit['bandwidth_GB_per_s']:.2f} GB/s.",
    ]
    print("\n".join(table))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "machine": machine.info(),
            "world_size": world.size(),
            "args": {"repeats": args.repeats, "out": str(args.out)},
            "rows": rows,
            "fit": fit,
        }
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=2))
        args.out.with_suffix(".md").write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
