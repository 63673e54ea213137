"""SmolLM2-135M-Instruct fine-tuned on held-out text task types with mlx-lm's own trainer
(``mlx_lm.tuner.train``, Adam), from four starting points:

- ``standard``: mlx-lm's LoRA init (``lora_a`` uniform, ``lora_b = 0``);
- ``multitask``: an adapter trained by mlx-lm's trainer on all meta-train tasks pooled,
  on as many training sequences as meta-training processes;
- ``meta``: the meta-learned init (``metapeft train`` on the packaged
  ``smollm2_text_tasks`` config, its ``best`` checkpoint, chosen on validation types);
- ``icl``: no fine-tuning, the support examples as earlier chat turns of the prompt.

Each task's 16 examples split into 8 support (the fine-tuning data) and 8 query (the
evaluation). After k steps the query loss (mean token cross-entropy of the completions,
mlx-lm's ``default_loss``) and the exact match of greedy generations are recorded. For
each init, one Adam learning rate is chosen on the validation task types, by the query
loss after ``max(KS)`` steps, from a grid that grows until the best value is inside it;
the test task types then report at that rate for every k, over the test tasks and the
meta-training seeds.

Every unit of work (a meta-training run, a multitask run, one adaptation curve) is
recorded in ``WORK/units.jsonl`` when done, so a rerun continues where the last stopped.

Usage:
    python experiments/smollm2_protocol.py --work-dir runs/smollm2-protocol \\
        --out results/<machine>/smollm2_protocol
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import yaml
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.generate import generate
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.datasets import CacheDataset, CompletionsDataset
from mlx_lm.tuner.trainer import TrainingArgs, iterate_batches, train
from mlx_lm.tuner.utils import linear_to_lora_layers
from scipy import stats

from metapeft import machine
from metapeft.lm import load_model, trainer_loss
from metapeft.lm.data import read_jsonl
from metapeft.lm.gguf import models_dir
from metapeft.nn import use_fast_layers

CONFIGS = Path(__file__).resolve().parents[1] / "metapeft" / "configs"
RUN_CONFIG = CONFIGS / "smollm2_text_tasks.yaml"
KS = (0, 1, 5, 20, 100)
FEW, MID = 5, 20  # the claims compare the meta init after FEW and MID steps with max(KS)
SUPPORT = 8  # examples per task to fine-tune on; the other 8 are the query
BATCH = 4  # mlx-lm's default batch size
LORA = {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "self_attn.v_proj"]}
NUM_LAYERS = -1  # every block (mlx-lm's -1), as the packaged config adapts


class Units:
    """The finished units of work, appended to a JSONL file as they finish."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                record = json.loads(line)
                self.done[record["key"]] = record

    def add(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.done[record["key"]] = record


@functools.cache
def split_tasks(path: Path) -> dict[str, tuple[list[dict], list[dict]]]:
    """Task name -> (support, query) records (each file read once)."""
    return {
        name: ([r for _, r in rows[:SUPPORT]], [r for _, r in rows[SUPPORT:]])
        for name, rows in read_jsonl(path).items()
    }


def dataset(records: list[dict], tokenizer) -> CacheDataset:
    return CacheDataset(CompletionsDataset(records, tokenizer, "prompt", "completion", True))


class Adapting:
    """SmolLM2 with mlx-lm's LoRA layers on metapeft's fast path, fine-tuned by
    ``mlx_lm.tuner.train``; ``curve`` adapts one task from one init."""

    def __init__(self, model_path: str) -> None:
        self.model, self.tokenizer, _ = load_model(model_path)
        self.model.freeze()
        linear_to_lora_layers(self.model, NUM_LAYERS, LORA)
        use_fast_layers(self.model)
        self.names = [k for k, _ in tree_flatten(self.model.trainable_parameters())]
        if not all(k.endswith(("lora_a", "lora_b")) for k in self.names):
            raise RuntimeError(f"more than the adapters is trainable: {self.names[:4]}")

    def standard_init(self, seed: int) -> dict[str, mx.array]:
        """mlx-lm's LoRALinear init, drawn with ``seed``."""
        mx.random.seed(seed)
        init = {}
        for k, v in tree_flatten(self.model.trainable_parameters()):
            if k.endswith("lora_a"):
                bound = 1 / np.sqrt(v.shape[0])
                init[k] = mx.random.uniform(-bound, bound, v.shape)
            else:
                init[k] = mx.zeros(v.shape)
        return init

    def set(self, weights: dict[str, mx.array]) -> None:
        missing = set(self.names) - set(weights)
        if missing:
            raise ValueError(f"the init lacks {len(missing)} adapters, e.g. {sorted(missing)[0]}")
        self.model.update(tree_unflatten([(k, weights[k]) for k in self.names]))
        mx.eval(self.model.trainable_parameters())

    def examples(self, query: list[dict], context: list[dict] = ()) -> list[tuple[list[int], int]]:
        """Each query example as mlx-lm's ``CompletionsDataset`` tokenises it (tokens, and
        the index where the completion starts), after ``context`` as earlier chat turns."""
        out = []
        for r in query:
            head = _turns(context) + [{"role": "user", "content": r["prompt"]}]
            full = head + [{"role": "assistant", "content": r["completion"]}]
            template = self.tokenizer.apply_chat_template
            offset = len(template(head, add_generation_prompt=True, return_dict=False))
            out.append((list(template(full, return_dict=False)), offset))
        return out

    def evaluate(
        self, query: list[dict], context=(), exact: bool = True
    ) -> tuple[float, float | None]:
        """Query loss (mlx-lm's ``default_loss``, as :func:`metapeft.lm.trainer_loss`
        computes it, over the completions) and, with ``exact``, the exact match of greedy
        generations (else None), with ``context`` as earlier chat turns."""
        examples = self.examples(query, context)
        batch = next(iterate_batches(examples, len(examples), 4096))
        loss = trainer_loss(self.model, *batch)[0].item()
        if not exact:
            return loss, None
        hits = 0
        for (tokens, offset), r in zip(examples, query, strict=True):
            target = r["completion"].strip()
            n = len(self.tokenizer.encode(target, add_special_tokens=False)) + 3
            text = generate(self.model, self.tokenizer, tokens[:offset], max_tokens=n)
            hits += text.strip() == target
        return loss, hits / len(query)

    def curve(self, init, support, query, lr: float, seed: int, exact: bool = True) -> dict:
        """Query loss and exact match after each k of ``KS`` Adam steps on ``support``."""
        self.set(init)
        record = {"loss": {}, "exact": {}}
        record["loss"]["0"], record["exact"]["0"] = self.evaluate(query, exact=exact)
        evaluate = self.evaluate

        class AtK(TrainingCallback):
            def on_train_loss_report(self, info: dict) -> None:
                if info["iteration"] in KS:
                    k = str(info["iteration"])
                    record["loss"][k], record["exact"][k] = evaluate(query, exact=exact)

        np.random.seed(seed)  # iterate_batches shuffles with numpy's global generator
        mx.random.seed(seed)
        args = TrainingArgs(
            batch_size=BATCH,
            iters=max(KS),
            steps_per_report=1,
            steps_per_eval=10**9,
            steps_per_save=10**9,
            adapter_file=os.devnull,
        )
        tic = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            train(
                self.model,
                optim.Adam(learning_rate=lr),
                dataset(support, self.tokenizer),
                args=args,
                loss=trainer_loss,
                training_callback=AtK(),
            )
        record["seconds"] = time.perf_counter() - tic
        return record


def _turns(records) -> list[dict]:
    turns = []
    for r in records:
        turns += [
            {"role": "user", "content": r["prompt"]},
            {"role": "assistant", "content": r["completion"]},
        ]
    return turns


def meta_train(args, units: Units, algorithm: str, seed: int) -> Path:
    """``metapeft train`` on the packaged config; returns the exported ``best`` adapters."""
    key = f"meta/{algorithm}/{seed}"
    run = args.work_dir / f"meta-{algorithm}-{seed}"
    adapters = run / "best-adapters"
    if key in units.done:
        return adapters
    env = dict(os.environ, METAPEFT_TRAINING__ALGORITHM=algorithm, METAPEFT_LM__MODEL=args.model)
    if algorithm == "reptile":
        env["METAPEFT_TRAINING__INNER_STEPS"] = str(args.reptile_inner_steps)
    command = [sys.executable, "-m", "metapeft", "train", "--config", str(RUN_CONFIG)]
    command += ["--seed", str(seed), "--num-iterations", str(args.meta_steps)]
    command += ["--output-dir", str(run)]
    if (run / "checkpoints" / "last.safetensors").exists():
        command.append("--resume")
    print(f"[{key}] {' '.join(command[1:])}", flush=True)
    tic = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    seconds = time.perf_counter() - tic
    best = run / "checkpoints" / "best.safetensors"
    export = [sys.executable, "-m", "metapeft", "export", str(best), "-f", "mlx-lm"]
    subprocess.run(export + ["-o", str(adapters)], check=True)
    config = json.loads((adapters / "adapter_config.json").read_text())
    if config["lora_parameters"] != LORA or config["num_layers"] != NUM_LAYERS:
        raise ValueError(f"{adapters}: adapters unlike the ones fine-tuned here: {config}")
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [m["val_query_loss"] for m in val if "val_query_loss" in m]
    units.add({"key": key, "seconds": seconds, "val_query_loss": val})
    return adapters


def multitask_train(args, units: Units, adapting: Adapting, seed: int) -> Path:
    """mlx-lm's trainer on every meta-train example pooled, from the standard init, on
    as many sequences as a meta-training run (T tasks x (support + query) per step)."""
    key = f"multitask/{seed}"
    path = args.work_dir / f"multitask-{seed}" / "adapters.safetensors"
    if key in units.done:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [
        r for rows in read_jsonl(CONFIGS / "text_tasks_train.jsonl").values() for _, r in rows
    ]
    config = yaml.safe_load(RUN_CONFIG.read_text())
    per_task = config["lm"]["support_size"] + config["lm"]["query_size"]
    sequences = args.meta_steps * config["training"]["meta_batch_size"] * per_task
    steps = sequences // args.multitask_batch
    adapting.set(adapting.standard_init(seed))
    np.random.seed(seed)
    mx.random.seed(seed)
    print(f"[{key}] {steps} steps of {args.multitask_batch} at lr {args.multitask_lr}", flush=True)
    tic = time.perf_counter()
    train(
        adapting.model,
        optim.Adam(learning_rate=args.multitask_lr),
        dataset(records, adapting.tokenizer),
        args=TrainingArgs(
            batch_size=args.multitask_batch,
            iters=steps,
            steps_per_report=max(steps // 10, 1),
            steps_per_eval=10**9,
            steps_per_save=10**9,
            adapter_file=str(path),
        ),
        loss=trainer_loss,
    )
    units.add({"key": key, "seconds": time.perf_counter() - tic, "steps": steps})
    return path


def init_weights(adapting: Adapting, kind: str, path: Path | None, seed: int) -> dict:
    if kind == "standard":
        return adapting.standard_init(seed)
    file = path / "adapters.safetensors" if path.is_dir() else path
    return mx.load(str(file))


def curves(args, units, adapting, split, kind, seed, path, names, lr, exact=True) -> list:
    """One adaptation curve per task of ``names``, at ``lr``; cached by key."""
    tasks = split_tasks(CONFIGS / f"text_tasks_{split}.jsonl")
    out = []
    for i, name in enumerate(names):
        key = f"curve/{split}/{kind}/{seed}/{name}/{lr:g}"
        if key not in units.done:
            # the standard init is drawn again for each task; the others are fixed
            init = init_weights(adapting, kind, path, 1000 * seed + i)
            record = adapting.curve(init, *tasks[name], lr, seed=i, exact=exact)
            units.add({"key": key, **record})
            loss = record["loss"][str(max(KS))]
            print(f"[{key}] loss at {max(KS)}: {loss:.4f} ({record['seconds']:.0f} s)", flush=True)
        out.append(units.done[key])
    return out


def choose_lr(args, units, adapting, kind: str, path) -> tuple[float, dict]:
    """The Adam learning rate with the lowest mean validation query loss after
    ``max(KS)`` steps, the grid widened by half decades until the best is inside it."""
    grid = sorted(args.lrs)
    while True:
        means = {}
        for lr in grid:
            rows = curves(args, units, adapting, "val", kind, 0, path, args.val_names, lr, False)
            means[float(lr)] = float(np.mean([r["loss"][str(max(KS))] for r in rows]))
        best = min(means, key=means.get)
        if not 1e-7 < best < 1:
            raise RuntimeError(f"{kind}: no learning rate in 1e-7..1 is best: {means}")
        if best == grid[0]:
            grid.insert(0, grid[0] / np.sqrt(10))
        elif best == grid[-1]:
            grid.append(grid[-1] * np.sqrt(10))
        else:
            return best, means


def icl(units: Units, adapting: Adapting, names: list[str]) -> list[dict]:
    tasks = split_tasks(CONFIGS / "text_tasks_test.jsonl")
    adapting.set(adapting.standard_init(0))  # lora_b = 0: the base model
    out = []
    for name in names:
        key = f"icl/test/{name}"
        if key not in units.done:
            support, query = tasks[name]
            loss, exact = adapting.evaluate(query, context=support)
            units.add({"key": key, "loss": loss, "exact": exact})
            print(f"[{key}] loss {loss:.4f}, exact match {exact:.3f}", flush=True)
        out.append(units.done[key])
    return out


def interval(values) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval."""
    values = np.asarray(values, dtype=float)
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean()), float(half)


def summarise(rows: dict[int, list[dict]], metric: str, k: int) -> dict:
    """Mean over tasks and seeds, with t-intervals over tasks (seed means) and over
    seeds (task means). ``rows``: seed -> one record per task."""
    table = np.array([[r[metric][str(k)] for r in per_task] for per_task in rows.values()])
    mean, over_tasks = interval(table.mean(axis=0))
    _, over_seeds = interval(table.mean(axis=1))
    return {"mean": mean, "ci_tasks": over_tasks, "ci_seeds": over_seeds}


def pick_test_names(args) -> list[str]:
    names = sorted(split_tasks(CONFIGS / "text_tasks_test.jsonl"))
    by_type: dict[str, list[str]] = {}
    for name in names:
        by_type.setdefault(name.split(":")[0], []).append(name)
    return [n for group in by_type.values() for n in group[: args.test_tasks_per_type]]


def paired(a: list[float], b: list[float]) -> str:
    """``mean(a - b) ± half-width`` over paired values, and how many pairs have a < b."""
    d = np.asarray(a) - np.asarray(b)
    mean, half = interval(d)
    return f"{mean:+.3f} ± {half:.3f} ({int((d < 0).sum())}/{len(d)} lower)"


def per_task(rows: dict[int, list[dict]], metric: str, k: int) -> list[float]:
    """Each task's value after ``k`` steps, averaged over seeds."""
    return list(np.mean([[r[metric][str(k)] for r in t] for t in rows.values()], axis=0))


def report(args, units, results, in_context, chosen, algorithm, test_names) -> None:
    kinds = {
        "standard": "(a) standard init",
        "multitask": "(b) multitask",
        "meta": f"(c) meta ({algorithm})",
    }
    lrs = {"standard": chosen["standard"][0], "multitask": chosen["multitask"][0]}
    lrs["meta"] = chosen[algorithm][0]
    summary = {
        kind: {m: {k: summarise(results[kind], m, k) for k in KS} for m in ("loss", "exact")}
        for kind in kinds
    }
    icl_loss, icl_exact = ([r[m] for r in in_context] for m in ("loss", "exact"))
    lines = [
        f"SmolLM2-135M-Instruct (fp32), {len(test_names)} test tasks of held-out types "
        f"({', '.join(test_names)}), {SUPPORT} support and {16 - SUPPORT} query examples each; "
        f"mlx_lm.tuner.train with Adam, batch {BATCH}, rank-{LORA['rank']} LoRA on q/v of all "
        f"blocks; seeds {args.seeds}. Mean ± 95% t-interval over tasks "
        "(seed means) / over seeds (task means).",
        "",
    ]
    for metric, title in (("loss", "query loss"), ("exact", "exact match")):
        lines += [f"| {title} | Adam lr | " + " | ".join(f"k={k}" for k in KS) + " |"]
        lines += ["|---|---:|" + "---:|" * len(KS)]
        for kind, label in kinds.items():
            cells = [
                f"{c['mean']:.3f} ± {c['ci_tasks']:.3f} / {c['ci_seeds']:.3f}"
                for c in (summary[kind][metric][k] for k in KS)
            ]
            lines += [f"| {label} | {lrs[kind]:.2g} | " + " | ".join(cells) + " |"]
        mean, half = interval(icl_loss if metric == "loss" else icl_exact)
        blank = " |" * (len(KS) - 1)
        lines += [f"| (d) in context, no fine-tuning | | {mean:.3f} ± {half:.3f} |{blank}", ""]
    meta, std = results["meta"], results["standard"]
    long = max(KS)
    std_long = summary["standard"]["loss"][long]["mean"]
    reach = [k for k in KS if summary["meta"]["loss"][k]["mean"] <= std_long]
    lines += [
        "Paired over tasks (seed means), meta minus the other; negative favours the meta init:",
        f"- query loss, meta at k={MID} vs standard at k={long}: "
        f"{paired(per_task(meta, 'loss', MID), per_task(std, 'loss', long))}",
        f"- query loss, meta vs standard at k={long}: "
        f"{paired(per_task(meta, 'loss', long), per_task(std, 'loss', long))}",
        f"- query loss, meta at k={FEW} vs in context: "
        f"{paired(per_task(meta, 'loss', FEW), icl_loss)}",
        f"- exact match, meta at k={FEW} vs in context (positive favours the meta init): "
        f"{paired(per_task(meta, 'exact', FEW), icl_exact)}",
        f"- query loss, meta vs multitask at k={MID}: "
        f"{paired(per_task(meta, 'loss', MID), per_task(results['multitask'], 'loss', MID))}",
        f"- the meta init's mean loss first reaches the standard init's k={long} loss "
        f"({std_long:.3f}) at k = {reach[0] if reach else 'none of ' + str(KS)}",
        "",
        f"Validation (types {', '.join(args.val_names)}) chose {algorithm} among "
        f"{', '.join(args.algorithms)} (mean loss at k={max(KS)}, each at its best lr):",
    ]
    for name, (lr, means) in chosen.items():
        grid = ", ".join(f"{x:.2g}: {v:.3f}" for x, v in sorted(means.items()))
        lines += [f"- {name}: lr {lr:.2g} (grid {grid})"]
    costs = {k: v for k, v in units.done.items() if k.startswith(("meta/", "multitask/"))}
    lines += [
        "",
        "Training time: " + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in costs.items()),
    ]
    print("\n".join(lines))
    if args.out is None:
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": machine.info(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "algorithm": algorithm,
        "learning_rates": {
            k: {"chosen": lr, "val_loss": {f"{x:g}": v for x, v in m.items()}}
            for k, (lr, m) in chosen.items()
        },
        "summary": summary,
        "icl": in_context,
        "units": list(units.done.values()),
    }
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(summary, (icl_loss, icl_exact), kinds, args.out.with_suffix(".png"))


def plot(summary, icl_values, kinds, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, values, title in zip(
        axes, ("loss", "exact"), icl_values, ("query loss", "exact match"), strict=True
    ):
        for kind, label in kinds.items():
            mean = [summary[kind][metric][k]["mean"] for k in KS]
            half = [summary[kind][metric][k]["ci_tasks"] for k in KS]
            ax.errorbar(KS, mean, yerr=half, marker="o", capsize=3, label=label)
        ax.axhline(np.mean(values), color="gray", linestyle="--", label="(d) in context")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(KS, [str(k) for k in KS])
        ax.set_xlabel("Adam steps k (mlx_lm.tuner.train)")
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(models_dir() / "smollm2-135m"))
    parser.add_argument("--work-dir", type=Path, default=Path("runs/smollm2-protocol"))
    parser.add_argument("--out", type=Path, help="results path without suffix")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--algorithms", nargs="+", default=["fomaml", "reptile", "maml"])
    parser.add_argument("--reptile-inner-steps", type=int, default=3)
    parser.add_argument("--meta-steps", type=int, default=200)
    parser.add_argument("--multitask-batch", type=int, default=8)
    parser.add_argument("--multitask-lr", type=float, default=1e-4)
    parser.add_argument("--lrs", type=float, nargs="+", default=[10**-3.5, 1e-3, 10**-2.5])
    parser.add_argument("--test-tasks-per-type", type=int, default=2)
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    units = Units(args.work_dir / "units.jsonl")
    adapting = Adapting(args.model)
    val = sorted(split_tasks(CONFIGS / "text_tasks_val.jsonl"))
    args.val_names = sorted({n.split(":")[0]: n for n in reversed(val)}.values())
    test_names = pick_test_names(args)

    # Meta-train each algorithm with the first seed; the validation types choose one.
    seed0 = args.seeds[0]
    paths = {("meta", a): meta_train(args, units, a, seed0) for a in args.algorithms}
    paths[("multitask",)] = multitask_train(args, units, adapting, seed0)
    chosen = {"standard": choose_lr(args, units, adapting, "standard", None)}
    chosen["multitask"] = choose_lr(args, units, adapting, "multitask", paths[("multitask",)])
    for a in args.algorithms:
        chosen[a] = choose_lr(args, units, adapting, f"meta-{a}", paths[("meta", a)])
    algorithm = min(args.algorithms, key=lambda a: chosen[a][1][chosen[a][0]])
    print(f"validation chooses {algorithm}; learning rates {chosen}", flush=True)

    results: dict[str, dict[int, list[dict]]] = {"standard": {}, "multitask": {}, "meta": {}}
    for seed in args.seeds:
        meta = meta_train(args, units, algorithm, seed)
        multitask = multitask_train(args, units, adapting, seed)
        for kind, path, lr in (
            ("standard", None, chosen["standard"][0]),
            ("multitask", multitask, chosen["multitask"][0]),
            (f"meta-{algorithm}", meta, chosen[algorithm][0]),
        ):
            rows = curves(args, units, adapting, "test", kind, seed, path, test_names, lr)
            results[kind.split("-")[0]][seed] = rows
    in_context = icl(units, adapting, test_names)
    report(args, units, results, in_context, chosen, algorithm, test_names)


if __name__ == "__main__":
    main()
