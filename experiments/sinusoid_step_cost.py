"""Where a sinusoid MAML meta-step's time goes: metapeft's MAML on a plain ``mlx.nn``
model, the same maths as plain MLX ``vmap`` + ``compile``, and as JAX ``vmap`` + ``jit``,
timed in turns at several meta-batch sizes T; a straight line through each one's
times splits it into a fixed cost per meta-step (building, dispatching and evaluating
the step's graph, whatever T) and a cost per task (the arithmetic).

Usage:
    python experiments/sinusoid_step_cost.py --out results/<machine>/sinusoid_step_cost
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import write_results

from metapeft.bench import peers, problems
from metapeft.bench.runner import BenchmarkRunner, prepare_process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="1,5,25,100")
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument(
        "--number", type=int, default=10, help="back-to-back steps per sample, as in training"
    )
    parser.add_argument("--impls", default="fused,mlx,jax", help="jax is left out if missing")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    conditions = prepare_process()
    impls = [i for i in args.impls.split(",") if i != "jax" or "jax" in peers.installed()]
    runner = BenchmarkRunner("sinusoid step cost")
    medians: dict[str, dict[int, float]] = {impl: {} for impl in impls}
    for tasks in (int(t) for t in args.tasks.split(",")):
        fns = {
            impl: problems.meta_step(
                "sinusoid", "maml", impl, tasks=tasks, inner_steps=args.inner_steps
            )
            for impl in impls
        }
        for op in runner.measure_interleaved(
            "sinusoid maml", fns, repeat=args.repeat, warmup=3, number=args.number, tasks=tasks
        ):
            medians[op.params["impl"]][tasks] = op.median
    rows, table = (
        [],
        [
            f"Sinusoid MAML (1-40-40-1, 10+10 shots, {args.inner_steps} inner step), medians of "
            f"{args.repeat} turns, each sample the mean of {args.number} back-to-back steps. "
            f"Conditions: {conditions}",
            "",
            "| implementation | "
            + " | ".join(f"T={t}" for t in medians["fused"])
            + " | fixed cost | per task |",
            "|---|" + "---:|" * (len(medians["fused"]) + 2),
        ],
    )
    for impl, by_t in medians.items():
        ts = np.array(list(by_t), dtype=float)
        slope, intercept = np.polyfit(ts, np.array(list(by_t.values())), 1)
        rows.append({"impl": impl, "medians_s": by_t, "fixed_s": intercept, "per_task_s": slope})
        cells = " | ".join(f"{v * 1e3:.3f} ms" for v in by_t.values())
        table.append(f"| {impl} | {cells} | {intercept * 1e6:.0f} us | {slope * 1e6:.1f} us |")
    write_results(args.out, args, rows, table)


if __name__ == "__main__":
    main()
