"""Few-shot digits: 5-way 1-shot and 5-shot accuracy on meta-test classes.

Meta-learners (MAML, FOMAML, Meta-SGD, Reptile) train on the meta-train classes
of :mod:`metapeft.tasks.digits` (rotated 8x8 digits, whole digits held out), then
adapt to 600 episodes drawn from the meta-test classes. Two baselines see the
same episodes: a network trained from random initialisation on the support set,
and one pretrained as a classifier on all meta-train classes whose hidden layers
are then fine-tuned with a fresh output layer. Every method adapts with the same
SGD step and number of steps. Accuracy is reported with a 95% confidence interval.

Usage:
    python experiments/digits.py --steps 3000 --out results/<machine>/digits
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
INNER_LR = 0.1
INNER_STEPS = 5
META_BATCH = 16


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


def meta_learner(name: str, model: nn.Module):
    adam = optim.Adam(1e-3, bias_correction=True)
    kwargs = {"inner_lr": INNER_LR, "inner_steps": INNER_STEPS}
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


def score(model: nn.Module, episodes, steps: int) -> tuple[float, float]:
    """Accuracy after fine-tuning every episode from ``model`` with plain SGD."""
    plain = MAML(model, inner_lr=INNER_LR)
    return confidence(
        plain.evaluate(episodes, steps, loss_fn=cross_entropy, metric_fn=accuracy)["query_metrics"]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--algorithms", default="maml,fomaml,metasgd,reptile")
    parser.add_argument("--eval-steps", type=int, default=10)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for shots in (1, 5):
        test = tasks("test", shots, seed=10_000 + args.seed).sample(args.episodes)
        for name in args.algorithms.split(","):
            model = network(args.seed)
            learner = meta_learner(name, model)
            train = tasks("train", shots, seed=args.seed)
            start = time.perf_counter()
            for step in range(1, args.steps + 1):
                metrics = learner.meta_train_step(train.sample(META_BATCH), cross_entropy)
                if step % max(1, args.steps // 5) == 0:
                    print(
                        f"  {shots}-shot {name} step {step}: query {metrics['query_loss']:.3f}",
                        flush=True,
                    )
            out = learner.evaluate(test, args.eval_steps, loss_fn=cross_entropy, metric_fn=accuracy)
            rows.append(
                {
                    "shots": shots,
                    "method": name,
                    "meta_steps": args.steps,
                    "train_seconds": time.perf_counter() - start,
                    "accuracy": confidence(out["query_metrics"]),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        for name, model in (
            ("random init", network(args.seed)),
            ("pretrained", pretrained(args.seed)),
        ):
            rows.append(
                {
                    "shots": shots,
                    "method": name,
                    "meta_steps": 0,
                    "accuracy": score(model, test, args.eval_steps),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    table = [
        f"5-way accuracy on {args.episodes} meta-test episodes after {args.eval_steps} SGD "
        f"steps (lr {INNER_LR}), 95% CI",
        "",
        "| method | meta-steps | 1-shot | 5-shot |",
        "|---|---:|---:|---:|",
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = {r["shots"]: r for r in rows if r["method"] == method}
        acc = {
            s: f"{100 * r['accuracy'][0]:.1f} ± {100 * r['accuracy'][1]:.1f}%"
            for s, r in cells.items()
        }
        table.append(f"| {method} | {cells[1]['meta_steps']} | {acc[1]} | {acc[5]} |")
    write_results(args.out, args, rows, table)


if __name__ == "__main__":
    main()
