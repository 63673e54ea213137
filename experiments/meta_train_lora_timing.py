"""``metapeft meta-train-lora`` end to end, as a user runs it, timed step by step.

The command runs in its own process on an mlx-lm model folder (by default
SmolLM2-135M-Instruct converted to float32 by ``fetch_smollm2.py --convert``), with
FOMAML, T=4 tasks per meta-step and 4 + 4 prompt/completion examples per task of
about 12 tokens (a letter-substitution family generated here), one inner step. The
command prints each meta-step's wall time; the first includes compilation.

Usage:
    python experiments/meta_train_lora_timing.py --model ~/.cache/metapeft/smollm2-135m \
        --out results/<machine>/meta_train_lora_timing
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_results

WORDS = ["apple", "river", "stone", "light", "green", "table", "music", "cloud", "bread", "chair"]


def write_tasks(path: Path, tasks: int, per_task: int, seed: int = 0) -> None:
    """Tasks of prompt/completion pairs: each task a letter substitution on words."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    lines = []
    for t in range(tasks):
        key = dict(zip(letters, rng.sample(letters, len(letters)), strict=True))
        for _ in range(per_task):
            word = rng.choice(WORDS)
            coded = "".join(key[c] for c in word)
            lines.append(
                {"task": f"t{t}", "prompt": f"Encode {word} ->", "completion": f" {coded}"}
            )
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path.home() / ".cache/metapeft/smollm2-135m")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--algorithm", default="fomaml")
    parser.add_argument("--meta-batch-size", type=int, default=4)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tasks = Path(tmp) / "tasks.jsonl"
        write_tasks(tasks, tasks=12, per_task=2 * args.shots)
        command = [
            sys.executable, "-m", "metapeft", "meta-train-lora",
            "--model", str(args.model), "--tasks", str(tasks), "--output-dir", f"{tmp}/init",
            "--algorithm", args.algorithm, "--meta-batch-size", str(args.meta_batch_size),
            "--support-size", str(args.shots), "--query-size", str(args.shots),
            "--inner-steps", "1", "--steps", str(args.steps),
        ]  # fmt: skip
        start = time.perf_counter()
        run = subprocess.run(command, capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - start
    if run.returncode != 0:
        sys.exit(f"meta-train-lora failed:\n{run.stdout}\n{run.stderr}")
    seconds = [float(s) for s in re.findall(r"^step \d+: .*\(([\d.]+) s\)$", run.stdout, re.M)]
    later = sorted(seconds[1:])
    rows = [{"step": i + 1, "seconds": s} for i, s in enumerate(seconds)]
    median = later[len(later) // 2] if later else float("nan")
    table = [
        f"`metapeft meta-train-lora` on {Path(args.model).name}: {args.algorithm}, "
        f"T={args.meta_batch_size}, {args.shots}+{args.shots} examples per task, "
        f"{args.steps} meta-steps; the command took {wall:.1f} s in all (loading included).",
        "",
        "| meta-step | seconds |",
        "|---:|---:|",
        *(f"| {r['step']} | {r['seconds']:.2f} |" for r in rows),
        "",
        f"First (compilation included): {seconds[0]:.2f} s; median of the others: {median:.2f} s.",
    ]
    args.command_seconds = wall
    args.model = str(args.model)
    write_results(args.out, args, rows, table)


if __name__ == "__main__":
    main()
