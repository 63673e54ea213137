"""Peak memory and time of one LoRA meta-step on a random mlx-lm model, for the three
ways of running the inner loop: all tasks at once (vmap), tasks one at a time, and
tasks one at a time with gradient checkpointing of the blocks.

The default model is Llama-shaped with d=2048, 16 blocks and an MLP of 5632 (about
0.9 billion parameters in bfloat16), T=4 tasks, FOMAML with one inner step, and
rank-8 adapters on the attention projections. Each mode runs in a fresh process, so
that peaks do not mix. The time includes building the step (compilation), since the
point is whether one step fits.

Usage:
    python experiments/lm_memory.py --out results/<machine>/lm_memory
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from common import write_results

from metapeft import lm
from metapeft.bench.problems import save_random_llama

MODES = ("all tasks at once", "one task at a time", "one task at a time + checkpointing")


def measure(args: argparse.Namespace, model_dir: Path, tasks_file: Path, mode: str) -> dict:
    """One meta-step in this process: peak bytes above the loaded model, and seconds."""
    model, tokenizer, _ = lm.load_model(model_dir)
    tasks = lm.TextTasks.from_jsonl(tasks_file, tokenizer, args.shots, args.shots)
    lm.add_lora(model, lm.LoRASpec(rank=8, keys=("self_attn.q_proj", "self_attn.v_proj")))
    if "checkpointing" in mode:
        lm.checkpoint_blocks(model)
    learner = lm.build_learner(model, "fomaml", 0.1, 1, 1e-3, batched=mode == "all tasks at once")
    episodes = tasks.sample(args.tasks)
    mx.eval(model.parameters())
    weights = mx.get_active_memory()
    mx.reset_peak_memory()
    start = time.perf_counter()
    learner.meta_train_step(episodes)
    seconds = time.perf_counter() - start
    return {
        "mode": mode,
        "weights_gb": weights / 1e9,
        "peak_gb": mx.get_peak_memory() / 1e9,
        "seconds": seconds,
        "tokens_per_task": 2 * args.shots * tasks.seq_length,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=2048)
    parser.add_argument("--num-layers", type=int, default=16)
    parser.add_argument("--intermediate-size", type=int, default=5632)
    parser.add_argument("--tasks", type=int, default=4, help="T")
    parser.add_argument("--shots", type=int, default=2, help="support (= query) examples")
    parser.add_argument("--length", type=int, default=32, help="characters per example")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure is not None:  # the child process of one mode
        result = measure(args, args.model_dir, args.model_dir / "tasks.jsonl", args.measure)
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        config = save_random_llama(
            model_dir, args.hidden_size, args.num_layers, args.intermediate_size, args.length
        )
        rows = []
        for mode in MODES:
            child = subprocess.run(
                [sys.executable, __file__, "--measure", mode, "--model-dir", str(model_dir)]
                + [
                    f"--{k.replace('_', '-')}={v}"
                    for k, v in vars(args).items()
                    if k in ("tasks", "shots")
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    params = config["num_hidden_layers"] * (
        2 * config["hidden_size"] ** 2
        + 2 * config["hidden_size"] * config["num_key_value_heads"] * config["head_dim"]
        + 3 * config["hidden_size"] * config["intermediate_size"]
    )
    table = [
        f"One FOMAML meta-step (1 inner step, T={args.tasks}, {args.shots}+{args.shots} examples "
        f"of {rows[0]['tokens_per_task'] // (2 * args.shots)} tokens per task) on a random "
        f"Llama, d={args.hidden_size}, {args.num_layers} blocks, {params / 1e9:.2f}B block "
        "parameters in bfloat16, rank-8 adapters on q_proj and v_proj.",
        "",
        "| inner loop | model weights (GB) | peak memory (GB) | time (s) |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        table.append(
            f"| {r['mode']} | {r['weights_gb']:.2f} | {r['peak_gb']:.2f} | {r['seconds']:.1f} |"
        )
    write_results(args.out, args, rows, table)


if __name__ == "__main__":
    main()
