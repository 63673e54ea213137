"""Few-shot digits: 5-way 1-shot and 5-shot accuracy on meta-test classes.

Meta-learners (MAML, FOMAML, Meta-SGD, Reptile) train on the meta-train classes
of :mod:`metapeft.tasks.digits` (rotated 8x8 digits, whole digits held out), then
adapt to 600 episodes drawn from the meta-test classes. Two baselines see the
same episodes: a network trained from random initialisation on the support set,
and one pretrained as a classifier on all meta-train classes whose hidden layers
are then fine-tuned with a fresh output layer. Each method's SGD step size is chosen
from a grid on episodes of the validation classes (the first seed; meta-learners with
``--tune-steps`` meta-steps), grown by half decades until the best is inside it, then
every seed runs with it. Accuracy is the mean over the test episodes of all seeds,
with a 95% confidence interval.

Usage:
    python experiments/digits.py --steps 3000 --seeds 0,1,2 --out results/<machine>/digits
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
from metapeft.tasks.digits import digits_data
from metapeft.training import accuracy, cross_entropy

WAYS = 5
HIDDEN = 128
INNER_STEPS = 5
META_BATCH = 16
BASELINES = ("random init", "pretrained")


def network(seed: int, outputs: int = WAYS) -> nn.Sequential:
    mx.random.seed(seed)
    return use_blas_linear(
        nn.Sequential(
            nn.Linear(64, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, outputs),
        )
    )


def tasks(split: str, shots: int, seed: int) -> TaskDistribution:
    config = TaskConfig(
        f"digits-{split}",
        "digits",
        WAYS,
        64,
        support_size=WAYS * shots,
        query_size=WAYS * 15,
        task_params={"split": split},
    )
    return TaskDistribution(config, seed=seed)


def meta_learner(name: str, model: nn.Module, inner_lr: float):
    adam = optim.Adam(1e-3, bias_correction=True)
    kwargs = {"inner_lr": inner_lr, "inner_steps": INNER_STEPS}
    if name == "reptile":
        return Reptile(model, epsilon=0.1, **kwargs)
    return {"maml": MAML, "fomaml": FOMAML, "metasgd": MetaSGD}[name](model, adam, **kwargs)


def pretrained(seed: int, epochs: int = 30) -> nn.Sequential:
    """A classifier of all meta-train classes, its output layer then replaced by a
    zero-initialised ``WAYS``-way one for fine-tuning."""
    x, y = digits_data("train")
    model = network(seed, outputs=int(y.max()) + 1)
    opt = optim.Adam(1e-3)
    step = nn.value_and_grad(model, cross_entropy)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for idx in np.array_split(rng.permutation(len(x)), max(1, len(x) // 64)):
            _, grads = step(model, mx.array(x[idx]), mx.array(y[idx]))
            opt.update(model, grads)
            mx.eval(model.parameters())
    model.layers[-1] = use_blas_linear(nn.Linear(HIDDEN, WAYS))
    model.layers[-1].update({"weight": mx.zeros((WAYS, HIDDEN)), "bias": mx.zeros((WAYS,))})
    return model


def score(model: nn.Module, episodes, steps: int, lr: float) -> list[float]:
    """Per-episode accuracies after fine-tuning every episode from ``model`` with SGD."""
    plain = MAML(model, inner_lr=lr)
    out = plain.evaluate(episodes, steps, loss_fn=cross_entropy, metric_fn=accuracy)
    return out["query_metrics"].tolist()


def accuracies(name: str, shots: int, lr: float, seed: int, steps: int, episodes, args) -> list:
    """``name`` (a meta-learner after ``steps`` meta-steps, or a baseline) adapted to each
    of ``episodes`` for ``--eval-steps`` steps of size ``lr``: per-episode accuracies."""
    if name == "random init":
        return score(network(seed), episodes, args.eval_steps, lr)
    if name == "pretrained":
        return score(pretrained(seed), episodes, args.eval_steps, lr)
    learner = meta_learner(name, network(seed), lr)
    train = tasks("train", shots, seed=seed)
    for step in range(1, steps + 1):
        try:
            metrics = learner.meta_train_step(train.sample(META_BATCH), cross_entropy)
        except FloatingPointError as e:  # this step size diverges
            print(f"  {shots}-shot {name} lr={lr}: {e}", flush=True)
            return [float("nan")] * len(episodes.support_x)
        if step % max(1, steps // 5) == 0:
            print(f"  {shots}-shot {name} lr={lr} step {step}: query {metrics['query_loss']:.3f}")
    out = learner.evaluate(episodes, args.eval_steps, loss_fn=cross_entropy, metric_fn=accuracy)
    return out["query_metrics"].tolist()


def tune(name: str, shots: int, grid: list[float], seed: int, steps: int, val, args):
    """The step size of best mean validation accuracy, and every step size's score; the
    grid grows by half decades past whichever end holds the best, until it is inside."""
    scores: dict[float, float] = {}
    grid = sorted(grid)
    while True:
        for lr in grid:
            if lr not in scores:
                mean = float(np.mean(accuracies(name, shots, lr, seed, steps, val, args)))
                scores[lr] = mean if np.isfinite(mean) else -1.0
        best = max(scores, key=scores.get)
        if best == grid[0]:
            grid.insert(0, best / 10**0.5)
        elif best == grid[-1]:
            grid.append(best * 10**0.5)
        else:
            return best, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--tune-steps", type=int, default=1000)
    parser.add_argument("--lr-grid", default="0.01,0.03,0.1,0.3,1.0")
    parser.add_argument("--algorithms", default="maml,fomaml,metasgd,reptile")
    parser.add_argument("--eval-steps", type=int, default=10)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    seeds = [int(v) for v in args.seeds.split(",")]
    grid = [float(v) for v in args.lr_grid.split(",")]
    rows = []
    for shots in (1, 5):
        val = tasks("val", shots, seed=20_000 + seeds[0]).sample(args.episodes)
        for name in [*args.algorithms.split(","), *BASELINES]:
            steps = 0 if name in BASELINES else args.steps
            tune_steps = 0 if name in BASELINES else args.tune_steps
            lr, scores = tune(name, shots, grid, seeds[0], tune_steps, val, args)
            start = time.perf_counter()
            pooled = []
            for seed in seeds:
                test = tasks("test", shots, seed=10_000 + seed).sample(args.episodes)
                pooled += accuracies(name, shots, lr, seed, steps, test, args)
            rows.append(
                {
                    "shots": shots,
                    "method": name,
                    "meta_steps": steps,
                    "lr": lr,
                    "validation_accuracy_by_lr": {str(k): v for k, v in scores.items()},
                    "seeds": seeds,
                    "seconds": time.perf_counter() - start,
                    "accuracy": confidence(np.array(pooled)),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    table = [
        f"5-way accuracy on {args.episodes} meta-test episodes per seed (seeds "
        f"{', '.join(map(str, seeds))}) after {args.eval_steps} SGD steps of each method's "
        "step size, tuned on validation episodes; 95% CI",
        "",
        "| method | meta-steps | step (1-shot, 5-shot) | 1-shot | 5-shot |",
        "|---|---:|---|---:|---:|",
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = {r["shots"]: r for r in rows if r["method"] == method}
        acc = {
            s: f"{100 * r['accuracy'][0]:.1f} ± {100 * r['accuracy'][1]:.1f}%"
            for s, r in cells.items()
        }
        steps_cell = f"{cells[1]['lr']:g}, {cells[5]['lr']:g}"
        table.append(
            f"| {method} | {cells[1]['meta_steps']} | {steps_cell} | {acc[1]} | {acc[5]} |"
        )
    write_results(args.out, args, rows, table)


if __name__ == "__main__":
    main()
