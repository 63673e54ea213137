"""Sinusoid regression (Finn et al. 2017) with MAML, FOMAML, Meta-SGD and Reptile.

Settings as published: a 1-40-40-1 ReLU network, 10-shot tasks (amplitude
U[0.1, 5], phase U[0, pi], x U[-5, 5]), meta-batch 25, bias-corrected Adam 1e-3
outside. Each algorithm's inner step size is chosen from a grid on validation tasks
(shorter runs, the first seed); then every seed meta-trains with it, and 600 held-out
test tasks, other draws than the validation ones, are adapted on 10 support points and
scored on 100 query points after 1 and 10 steps. The table gives the mean MSE over the
seeds, with a 95% confidence interval over tasks and seeds.

Usage:
    python experiments/sinusoid.py --steps 20000 --seeds 0,1,2 --out results/<machine>/sinusoid
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from common import confidence, write_results

from metapeft.learners import FOMAML, MAML, MetaSGD, Reptile
from metapeft.nn import use_blas_linear
from metapeft.tasks import TaskConfig, TaskDistribution
from metapeft.training import mse

META_BATCH = 25


def network(seed: int) -> nn.Module:
    mx.random.seed(seed)
    model = nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )
    return use_blas_linear(model)


def learner(name: str, model: nn.Module, inner_steps: int, inner_lr: float):
    adam = optim.Adam(1e-3, bias_correction=True)
    if name == "maml":
        return MAML(model, adam, inner_lr=inner_lr, inner_steps=inner_steps)
    if name == "fomaml":
        return FOMAML(model, adam, inner_lr=inner_lr, inner_steps=inner_steps)
    if name == "metasgd":
        return MetaSGD(model, adam, inner_lr=inner_lr, inner_steps=inner_steps)
    if name == "reptile":
        # Reptile's outer step is its own interpolation; it adapts for 5 steps.
        return Reptile(model, epsilon=0.1, inner_lr=inner_lr, inner_steps=5)
    raise ValueError(f"unknown algorithm {name!r}")


def held_out(seed: int, tasks: int, validation: bool):
    """Validation or test tasks: other draws than training's, and than each other's."""
    offset = 20_000 if validation else 10_000
    name = "sine-val" if validation else "sine-test"
    config = TaskConfig(name, "sinusoid", 0, 1, support_size=10, query_size=100)
    return TaskDistribution(config, seed=offset + seed).sample(tasks)


def run(
    name: str, steps: int, inner_steps: int, inner_lr: float, seed: int, tasks, ks=(1, 10)
) -> dict:
    """Meta-trains ``name`` for ``steps`` and scores it on ``tasks`` after each of ``ks``
    adaptation steps."""
    train = TaskDistribution(
        TaskConfig("sine-train", "sinusoid", 0, 1, support_size=10, query_size=10), seed=seed
    )
    model = network(seed)
    meta = learner(name, model, inner_steps, inner_lr)
    out = {"algorithm": name, "meta_steps": steps, "inner_lr": inner_lr, "seed": seed}
    start = time.perf_counter()
    for step in range(1, steps + 1):
        try:
            metrics = meta.meta_train_step(train.sample(META_BATCH), mse)
        except FloatingPointError as e:  # this step size diverges: no score
            print(f"  {name} inner_lr={inner_lr}: {e}", flush=True)
            out["train_seconds"] = time.perf_counter() - start
            return {**out, **{f"losses_{k}": [float("nan")] * len(tasks.support_x) for k in ks}}
        if step % max(1, steps // 10) == 0:
            rate = step / (time.perf_counter() - start)
            print(
                f"  {name} step {step}/{steps}  query {metrics['query_loss']:.3f}  "
                f"{rate:.0f} steps/s",
                flush=True,
            )
    seconds = time.perf_counter() - start
    # adaptation uses the inner step size of meta-training (Meta-SGD: its learned rates)
    out["train_seconds"] = seconds
    for k in ks:
        out[f"losses_{k}"] = meta.evaluate(tasks, steps=k, loss_fn=mse)["query_losses"].tolist()
    return out


def tune(name: str, args: argparse.Namespace) -> tuple[float, dict[float, float]]:
    """The grid's inner step size with the lowest validation MSE after one step (the
    first seed, ``--tune-steps`` meta-steps); and every point's score."""
    val = held_out(args.seed_list[0], args.eval_tasks, validation=True)
    scores = {}
    for lr in args.lr_grid:
        row = run(name, args.tune_steps, args.inner_steps, lr, args.seed_list[0], val, ks=(1,))
        mean = float(np.mean(row["losses_1"]))
        scores[lr] = mean if np.isfinite(mean) else float("inf")
        print(f"  tune {name} inner_lr={lr}: validation MSE {scores[lr]:.3f}", flush=True)
    return min(scores, key=scores.get), scores


def format_table(rows: list[dict], seeds: list[int]) -> list[str]:
    """Markdown rows; a non-finite mean (the inner loop diverged) is reported as such."""

    def cell(values: list[float]) -> str:
        mean, ci = confidence(np.array(values))
        return f"{mean:.3f} ± {ci:.3f}" if np.isfinite(mean) else "diverges"

    table = [
        f"Seeds {', '.join(map(str, seeds))}; the MSE is the mean over the test tasks of all "
        "seeds, with a 95% confidence interval.",
        "",
        "| algorithm | inner step (tuned) | meta-steps | MSE after 1 step | MSE after 10 steps |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        table.append(
            f"| {r['algorithm']} | {r['inner_lr']:g} | {r['meta_steps']} | "
            f"{cell(r['losses_1'])} | {cell(r['losses_10'])} |"
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--tune-steps", type=int, default=5_000)
    parser.add_argument("--lr-grid", default="0.001,0.003,0.01,0.03,0.1")
    parser.add_argument("--algorithms", default="maml,fomaml,metasgd,reptile")
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--eval-tasks", type=int, default=600)
    parser.add_argument("--out", type=Path, help="write <out>.json and <out>.md")
    args = parser.parse_args()
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    args.lr_grid = [float(v) for v in args.lr_grid.split(",")]
    rows = []
    for name in args.algorithms.split(","):
        lr, scores = tune(name, args)
        per_seed = []
        for seed in args.seed_list:
            test = held_out(seed, args.eval_tasks, validation=False)
            per_seed.append(run(name, args.steps, args.inner_steps, lr, seed, test))
        rows.append(
            {
                "algorithm": name,
                "inner_lr": lr,
                "validation_mse_by_inner_lr": {str(k): v for k, v in scores.items()},
                "meta_steps": args.steps,
                "seeds": args.seed_list,
                "train_seconds": [r["train_seconds"] for r in per_seed],
                "losses_1": [x for r in per_seed for x in r["losses_1"]],
                "losses_10": [x for r in per_seed for x in r["losses_10"]],
            }
        )
        print(json.dumps({k: v for k, v in rows[-1].items() if "losses" not in k}), flush=True)
    table = format_table(rows, args.seed_list)
    write_results(args.out, args, rows, table)


if __name__ == "__main__":
    main()
