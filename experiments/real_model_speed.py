"""A LoRA forward+backward and a FOMAML meta-step on a pretrained model's shape: metapeft
against PyTorch (transformers + peft) and stock mlx-lm, timed in turns in one process.

Peak memory is measured for each implementation in a fresh process with glibc's
default allocation (large blocks mapped afresh and returned when freed): after a
first step (which compiles), MLX's buffer cache is cleared and freed memory handed
back (malloc_trim), then the peak resident memory of two more steps is read from
/proc (VmHWM, reset through /proc/self/clear_refs). It is reported above what the
process held before them (the model, the inputs, the libraries) and in total: the
same measure for MLX and torch.

Each implementation is also timed alone in a process of its own (median of five
steps after a first), in the conditions of the benchmarks: implementations timed in
turns in one process slow each other through the caches and the threads they leave.

Two rooflines: the step's GFLOP of matrix products (``step_products``) at the BLAS's
rate on a 2048^3 product (``ops.linear``), measured in the same run; and the time the
BLAS takes for those very products alone, at their shapes and in order, each weight
one array as in the model (``blas_products``), timed in turns with the step in the
process that times it alone: the ratio of the two is robust to the machine's speed
drifting during the run.

Usage:
    python experiments/real_model_speed.py --shape smollm2-135m --out results/<machine>/real_model
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
from common import write_results

from metapeft import blas, ops
from metapeft.bench import real_model
from metapeft.bench.runner import BenchmarkRunner, prepare_process

KINDS = ("lora fwd+bwd", "fomaml meta-step")


def build(kind: str, shape: str, impl: str, args: argparse.Namespace):
    if kind == "lora fwd+bwd":
        return real_model.lora_step(shape, impl, batch=args.batch, length=args.length)
    return real_model.meta_step(
        shape, impl, tasks=args.tasks, shots=args.shots, length=args.meta_length
    )


def blas_rate() -> float:
    """GFLOP/s of ops.linear on a 2048^3 float32 product (median of 10)."""
    a, b = mx.random.normal((2048, 2048)), mx.random.normal((2048, 2048))
    mx.eval(a, b)
    times = []
    for _ in range(12):
        start = time.perf_counter()
        mx.eval(ops.linear(a, b))
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / sorted(times[2:])[5] / 1e9


def passes(kind: str, args: argparse.Namespace) -> list[tuple[int, int]]:
    """(sequences, tokens each) of each LoRA forward+backward pass in a step: one for
    the LoRA step; for the meta-step, the support pass and the query pass (every task's
    adapters as one)."""
    if kind == "lora fwd+bwd":
        return [(args.batch, args.length)]
    return [(args.tasks * args.shots, args.meta_length)] * 2


def blas_products(products: list[real_model.Product]) -> Callable[[], None]:
    """A function that runs ``products`` alone on the BLAS: all of them through
    ops.linear in one evaluation, each weight one array as in the model."""
    weights: dict[str, mx.array] = {}
    activations: dict[tuple[int, ...], mx.array] = {}  # one per shape
    operands = []
    for p in products:
        batch = (p.batch,) if p.batch > 1 else ()
        x = activations.setdefault((*batch, p.m, p.k), mx.random.normal((*batch, p.m, p.k)))
        if p.weight is None:
            w = activations.setdefault((*batch, p.n, p.k), mx.random.normal((*batch, p.n, p.k)))
        else:
            stored = (p.k, p.n) if p.transposed else (p.n, p.k)
            w = weights.setdefault(p.weight, mx.random.normal(stored))
            w = w.T if p.transposed else w
        operands.append((x, w))
    mx.eval([*weights.values(), *activations.values()])
    return lambda: mx.eval([ops.linear(x, w) for x, w in operands])


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_memory(kind: str, shape: str, impl: str, args: argparse.Namespace) -> dict:
    """In this process: peak resident bytes of two steps, and the bytes held before."""
    step = build(kind, shape, impl, args)
    mx.eval(step())
    gc.collect()
    mx.clear_cache()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before = _status("VmRSS")
    mx.reset_peak_memory()
    for _ in range(2):
        mx.eval(step())
    return {
        "peak_above_start_bytes": _status("VmHWM") - before,
        "peak_bytes": _status("VmHWM"),
        "held_before_bytes": before,
        "mlx_peak_bytes": mx.get_peak_memory() if impl != "torch" else None,
    }


def time_alone(kind: str, shape: str, impl: str, args: argparse.Namespace) -> dict:
    """In this process, in turns after a first call of each: the median seconds of five
    steps, and of five runs of the step's products alone on the BLAS."""
    step = build(kind, shape, impl, args)
    products = [p for n in passes(kind, args) for p in real_model.step_products(shape, *n)]
    fns = {"alone_s": lambda: mx.eval(step()), "products_alone_s": blas_products(products)}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(6):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: sorted(values)[2] for name, values in times.items()}


def in_subprocess(mode: str, kind: str, shape: str, impl: str, args: argparse.Namespace) -> dict:
    argv = [sys.executable, __file__, mode, kind, impl, "--shape", shape]
    for name in ("batch", "length", "tasks", "shots", "meta_length"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(real_model.SHAPES))
    parser.add_argument("--batch", type=int, default=4, help="sequences of the LoRA step")
    parser.add_argument("--length", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--tasks", type=int, default=4, help="tasks per meta-step")
    parser.add_argument("--shots", type=int, default=4, help="support (and query) sequences")
    parser.add_argument("--meta-length", type=int, default=16, help="tokens per meta-step sequence")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--lora-impls", default="fused,torch,mlx-lm")
    parser.add_argument("--meta-impls", default="fused,torch")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--no-memory", action="store_true", help="skip the memory processes")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "IMPL"), help=argparse.SUPPRESS)
    parser.add_argument("--alone", nargs=2, metavar=("KIND", "IMPL"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_memory(args.child[0], args.shape, args.child[1], args)))
        return
    conditions = prepare_process()
    if args.alone:
        print(json.dumps(time_alone(args.alone[0], args.shape, args.alone[1], args)))
        return

    runner = BenchmarkRunner(f"real model {args.shape}")
    rate = blas_rate()
    rows = []
    for kind in args.kinds.split(","):
        impls = (args.lora_impls if kind == "lora fwd+bwd" else args.meta_impls).split(",")
        gflop = sum(real_model.step_gflop(args.shape, *n) for n in passes(kind, args))
        print(f"{kind}: building {', '.join(impls)}", flush=True)
        fns = {impl: build(kind, args.shape, impl, args) for impl in impls}
        ops_ = runner.measure_interleaved(kind, fns, repeat=args.repeat, warmup=1)
        medians = {op.params["impl"]: op.median for op in ops_}
        del fns
        for impl, seconds in medians.items():
            row = {
                "kind": kind,
                "impl": impl,
                "median_s": seconds,
                "gflop": gflop,
                "roofline_s": gflop / rate,
                "vs_fused": seconds / medians["fused"],
            }
            if not args.no_memory:
                print(f"{kind}: {impl} alone, and its memory", flush=True)
                row |= in_subprocess("--alone", kind, args.shape, impl, args)
                row |= in_subprocess("--child", kind, args.shape, impl, args)
            rows.append(row)

    table = [
        f"Shape {args.shape}, float32; LoRA step {args.batch}x{args.length} tokens; meta-step "
        f"T={args.tasks}, {args.shots}+{args.shots} sequences of {args.meta_length} tokens; "
        f"{rows[0]['gflop'] if rows else 0:.1f} and {rows[-1]['gflop'] if rows else 0:.1f} GFLOP "
        f"of products. BLAS ({blas.name()}) {rate:.0f} GFLOP/s (2048^3); the roofline is the "
        "GFLOP at that rate. Alone, each implementation's step is timed in a process of its "
        "own, in turns with the step's products alone on the BLAS (at their shapes, with "
        f"the model's weights). Conditions: {conditions}",
        "",
        "| step | implementation | median in turns | x roofline | time / fused's | alone | "
        "alone / fused alone | its products alone | alone x products alone | "
        "peak memory above start | peak memory |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        above, total, alone, products = (
            r.get(k)
            for k in ("peak_above_start_bytes", "peak_bytes", "alone_s", "products_alone_s")
        )
        fused_alone = next(
            (x.get("alone_s") for x in rows if x["kind"] == r["kind"] and x["impl"] == "fused"),
            None,
        )
        table.append(
            f"| {r['kind']} | {r['impl']} | {r['median_s']:.3f} s | "
            f"{r['median_s'] / r['roofline_s']:.2f} | {r['vs_fused']:.2f} | "
            f"{'-' if alone is None else f'{alone:.3f} s'} | "
            f"{'-' if alone is None or not fused_alone else f'{alone / fused_alone:.2f}'} | "
            f"{'-' if products is None else f'{products:.3f} s'} | "
            f"{'-' if alone is None or products is None else f'{alone / products:.2f}'} | "
            f"{'-' if above is None else f'{above / 1e6:.0f} MB'} | "
            f"{'-' if total is None else f'{total / 1e6:.0f} MB'} |"
        )
    args.blas_gflops = rate
    write_results(args.out, args, rows, table)


if __name__ == "__main__":
    main()
