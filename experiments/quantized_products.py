"""Products with a 4-bit base weight (QLoRA) on the CPU: MLX's ``quantized_matmul``
against dequantizing the weight and multiplying on metapeft's BLAS (what
:func:`metapeft.nn.use_fast_layers` and ``QLoRALinear`` do on the CPU), forward and
with the input's gradient, at SmolLM2-135M's sizes (256 tokens) and its tied output
layer; medians, timed in turns.

Usage:
    python experiments/quantized_products.py --out results/<machine>/quantized_products
"""

from __future__ import annotations

import argparse
from pathlib import Path

import mlx.core as mx
from common import write_results

from metapeft import ops
from metapeft.bench.runner import BenchmarkRunner, prepare_process

SIZES = "256x576x576,256x576x1536,256x1536x576,256x576x49152"


def measure(runner: BenchmarkRunner, m: int, k: int, n: int, args) -> dict[str, float]:
    """Median seconds of each way, forward and forward+backward, at one size."""
    x = mx.random.normal((m, k))
    w, scales, biases = mx.quantize(mx.random.normal((n, k)) * 0.02, 32, args.bits)
    cot = mx.random.normal((m, n))
    mx.eval(x, w, scales, biases, cot)

    def stock(x):
        return mx.quantized_matmul(x, w, scales, biases, True, 32, args.bits)

    def dequantized(x):
        return ops.linear(x, mx.dequantize(w, scales, biases, 32, args.bits))

    fns = {}
    for name, f in (("quantized_matmul", stock), ("dequantize + BLAS", dequantized)):
        fwd = mx.compile(f)
        fwd_bwd = mx.compile(mx.grad(lambda x, f=f: (f(x) * cot).sum()))
        fns[f"{name} fwd"] = lambda fwd=fwd: fwd(x)
        fns[f"{name} fwd+bwd"] = lambda fwd_bwd=fwd_bwd: fwd_bwd(x)
    size = f"{m}x{k}x{n}"
    ops_ = runner.measure_interleaved(size, fns, repeat=args.repeat, warmup=1, size=size)
    return {op.params["impl"]: op.median for op in ops_}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=SIZES, help="rows x d_in x d_out, comma-separated")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    conditions = prepare_process()
    runner = BenchmarkRunner("quantized products")
    rows = []
    for m, k, n in (map(int, s.split("x")) for s in args.sizes.split(",")):
        rows.append({"size": f"{m}x{k}x{n}", "medians_s": measure(runner, m, k, n, args)})
    table = [
        f"{args.bits}-bit weights (group 32), float32 inputs; medians of {args.repeat} turns. "
        f"Conditions: {conditions}",
        "",
        "| rows x d_in x d_out | quantized_matmul fwd | dequantize + BLAS fwd | "
        "quantized_matmul fwd+bwd | dequantize + BLAS fwd+bwd |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = r["medians_s"]
        table.append(
            f"| {r['size']} | {t['quantized_matmul fwd'] * 1e3:.2f} ms | "
            f"{t['dequantize + BLAS fwd'] * 1e3:.2f} ms | "
            f"{t['quantized_matmul fwd+bwd'] * 1e3:.2f} ms | "
            f"{t['dequantize + BLAS fwd+bwd'] * 1e3:.2f} ms |"
        )
    write_results(args.out, args, rows, table)


if __name__ == "__main__":
    main()
