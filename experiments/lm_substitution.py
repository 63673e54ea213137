"""A meta-learned LoRA initialisation against mlx-lm's standard one and a pooled
adapter, on a small language model and a learnable family of text tasks.

Each task is a letter substitution (a random map of ``a..h`` onto itself) shown as
``"abc>" -> "hgf"``; the loss counts the completion only. A random Llama-style model
(d=64, 2 blocks, character tokenizer, saved in mlx-lm's layout) gets rank-8 adapters
on every Linear of its blocks. Three initialisations of those adapters:

- ``meta``: meta-trained (FOMAML by default) on the training tasks;
- ``standard``: mlx-lm's fresh adapter (``lora_a`` uniform, ``lora_b = 0``);
- ``pooled``: one adapter trained with Adam on every training example pooled,
  for as many gradient evaluations as meta-training used.

Held-out tasks are adapted from each by k in {1, 5, 20} SGD steps on their support
set and scored on their query set. The SGD step size is chosen for each (init, k)
from a grid grown until the choice is inside it, on validation tasks apart from the
test tasks; the test tasks and their episodes are the same for all three. The table
gives the mean query loss with a 95% confidence interval over tasks and the paired
difference to ``meta``.

Usage:
    python experiments/lm_substitution.py --out results/<machine>/lm_substitution
    python experiments/lm_substitution.py --plot results/<machine>/lm_substitution.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from common import confidence, write_results
from mlx.utils import tree_map

from metapeft import lm
from metapeft.lm.random_model import save_random_model

LETTERS = "abcdefgh"
KS = (1, 5, 20)
LRS = (0.05, 0.1, 0.2, 0.5, 1.0)


def write_tasks(path: Path, num_tasks: int, per_task: int, seed: int) -> None:
    rng = random.Random(seed)
    lines = []
    for t in range(num_tasks):
        key = dict(zip(LETTERS, rng.sample(LETTERS, len(LETTERS)), strict=True))
        for _ in range(per_task):
            word = "".join(rng.choice(LETTERS) for _ in range(4))
            completion = "".join(key[c] for c in word)
            lines.append({"task": f"t{t}", "prompt": word + ">", "completion": completion})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def pooled_adapter(model, tasks: lm.TextTasks, init, grad_evals: int, batch: int, lr: float):
    """Adam on batches of examples from all training tasks, ``grad_evals`` gradients."""
    model.update(init)
    opt = optim.Adam(lr, bias_correction=True)
    grad_fn = mx.value_and_grad(lambda p, x, y: _loss_with(model, p, x, y))
    examples = [e for name in tasks.names for e in tasks.tasks[name]]
    rng = np.random.default_rng(0)
    params = model.trainable_parameters()
    for _ in range(grad_evals):
        x, y = tasks.encode([examples[i] for i in rng.choice(len(examples), batch)])
        _, g = grad_fn(params, mx.array(x), mx.array(y))
        params = opt.apply_gradients(g, params)
        mx.eval(params, opt.state)
    return params


def _loss_with(model, params, x, y):
    model.update(params)
    return lm.lm_loss(model, x, y)


def choose_lr(learner, episodes, k: int) -> tuple[float, dict[float, float]]:
    """The SGD step size of lowest mean query loss on ``episodes`` after ``k`` steps,
    from :data:`LRS` grown by doublings past whichever end holds the best, until the
    best is inside (a step size that diverges scores infinity), and every score."""
    grid, scores = list(LRS), {}
    while True:
        for lr in grid:
            if lr not in scores:
                learner.inner_lr = lr
                loss = learner.evaluate(episodes, steps=k)["query_loss"]
                scores[lr] = loss if math.isfinite(loss) else math.inf
        best = min(scores, key=scores.get)
        if not 1e-4 < best < 100:
            raise RuntimeError(f"k={k}: no step size in 1e-4..100 is best: {scores}")
        if best == grid[0]:
            grid.insert(0, best / 2)
        elif best == grid[-1]:
            grid.append(best * 2)
        else:
            return best, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithm", default="fomaml", choices=lm.ALGORITHMS)
    parser.add_argument("--steps", type=int, default=600, help="meta-steps")
    parser.add_argument("--meta-batch", type=int, default=8)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--inner-lr", type=float, default=0.2)
    parser.add_argument("--outer-lr", type=float, default=3e-3)
    parser.add_argument("--train-tasks", type=int, default=200)
    parser.add_argument("--val-tasks", type=int, default=50, help="to choose the step size")
    parser.add_argument("--eval-tasks", type=int, default=100)
    parser.add_argument("--shots", type=int, default=8, help="support (= query) examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        save_random_model(root / "model", "llama", seed=args.seed, hidden_size=64, num_layers=2)
        total = args.train_tasks + args.val_tasks + args.eval_tasks
        write_tasks(root / "tasks.jsonl", total, 2 * args.shots + 4, args.seed)
        model, tokenizer, _ = lm.load_model(root / "model")
        tasks = lm.TextTasks.from_jsonl(
            root / "tasks.jsonl", tokenizer, args.shots, args.shots, seed=args.seed
        )
    names = [f"t{i}" for i in range(total)]
    train = tasks.subset(names[: args.train_tasks], seed=args.seed)
    split = args.train_tasks + args.val_tasks
    validation = tasks.subset(names[args.train_tasks : split], seed=args.seed + 1)
    held_out = tasks.subset(names[split:], seed=args.seed + 2)

    mx.random.seed(args.seed)
    spec = lm.LoRASpec(rank=8, alpha=16.0)
    lm.add_lora(model, spec)
    standard = tree_map(lambda p: p, model.trainable_parameters())
    learner = lm.build_learner(
        model, args.algorithm, args.inner_lr, args.inner_steps, args.outer_lr, batched=True
    )
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        metrics = learner.meta_train_step(train.sample(args.meta_batch))
        if step % 100 == 0 or step == args.steps:
            print(f"meta-step {step}/{args.steps}: query {metrics['query_loss']:.3f}", flush=True)
    meta_seconds = time.perf_counter() - start
    meta = tree_map(lambda p: p, model.trainable_parameters())

    grad_evals = args.steps * args.meta_batch * (args.inner_steps + 1)
    start = time.perf_counter()
    pooled = pooled_adapter(model, train, standard, grad_evals // 4, 4 * args.shots, 1e-3)
    pooled_seconds = time.perf_counter() - start

    val_episodes = validation.sample(args.val_tasks)  # each task once
    episodes = held_out.sample(args.eval_tasks)
    losses: dict[tuple[str, int], np.ndarray] = {}
    chosen_lr: dict[tuple[str, int], float] = {}
    scores: dict[tuple[str, int], dict[float, float]] = {}
    for init_name, init in (("meta", meta), ("standard", standard), ("pooled", pooled)):
        model.update(init)
        for k in KS:
            lr, scores[init_name, k] = choose_lr(learner, val_episodes, k)
            chosen_lr[init_name, k] = learner.inner_lr = lr
            losses[init_name, k] = learner.evaluate(episodes, steps=k)["query_losses"]

    rows = []
    table = [
        f"Query loss (nats/token) on {args.eval_tasks} held-out substitution tasks after k SGD "
        f"steps on {args.shots} support examples; mean ± 95% CI; step size (lr) chosen per "
        f"cell on {args.val_tasks} validation tasks from {list(LRS)}, grown by doublings "
        "past the end that held the best until it was inside; Δ = init − meta, paired.",
        "",
        "| init | "
        + " | ".join(f"k={k}" for k in KS)
        + " | "
        + " | ".join(f"Δ k={k}" for k in KS)
        + " |",
        "|---|" + "---:|" * (2 * len(KS)),
    ]
    for init_name in ("meta", "standard", "pooled"):
        cells, deltas = [], []
        for k in KS:
            mean, half = confidence(losses[init_name, k])
            d_mean, d_half = confidence(losses[init_name, k] - losses["meta", k])
            rows.append(
                {
                    "init": init_name,
                    "k": k,
                    "query_loss": mean,
                    "ci95": half,
                    "minus_meta": d_mean,
                    "minus_meta_ci95": d_half,
                    "sgd_lr": chosen_lr[init_name, k],
                    "validation_loss_by_lr": {str(lr): v for lr, v in scores[init_name, k].items()},
                }
            )
            cells.append(f"{mean:.3f} ± {half:.3f} (lr {chosen_lr[init_name, k]:g})")
            deltas.append("—" if init_name == "meta" else f"{d_mean:+.3f} ± {d_half:.3f}")
        table.append(f"| {init_name} | " + " | ".join(cells + deltas) + " |")
    table += [
        "",
        f"Meta-training: {args.algorithm}, {args.steps} steps of {args.meta_batch} tasks, "
        f"{args.inner_steps} inner steps of lr {args.inner_lr}, outer lr {args.outer_lr} "
        f"({meta_seconds:.0f} s). "
        f"Pooled: Adam 1e-3, {grad_evals // 4} steps of {4 * args.shots} examples "
        f"({pooled_seconds:.0f} s). Model: random Llama d=64, 2 blocks, rank-8 adapters on "
        "every Linear of the blocks.",
    ]
    write_results(args.out, args, rows, table)
    if args.out is not None:
        plot(rows, args.out.with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    """Query loss against fine-tuning steps k for each initialisation, 95% CI bars."""
    from metapeft.plotting import new_figure, save_png

    names = {"meta": "meta-learned", "standard": "mlx-lm standard (lora_b = 0)", "pooled": "pooled"}
    fig, ax = new_figure(5, 3.5)
    for init in dict.fromkeys(r["init"] for r in rows):
        mine = sorted((r for r in rows if r["init"] == init), key=lambda r: r["k"])
        ax.errorbar(
            [r["k"] for r in mine],
            [r["query_loss"] for r in mine],
            yerr=[r["ci95"] for r in mine],
            marker="o",
            capsize=3,
            label=names.get(init, init),
        )
    ax.set_xscale("log")
    ax.set_xlabel("fine-tuning steps k on a held-out task")
    ax.set_ylabel("query loss (nats/token)")
    ax.legend(fontsize=8)
    save_png(fig, path)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--plot":  # redraw from a saved JSON
        saved = Path(sys.argv[2])
        plot(json.loads(saved.read_text())["rows"], saved.with_suffix(".png"))
    else:
        main()
