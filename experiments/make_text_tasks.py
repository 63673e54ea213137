"""Writes the few-shot text task families of :mod:`metapeft.lm.text_families` as JSONL,
one file per split of task types (``train``, ``val``, ``test``, disjoint), for
``metapeft meta-train-lora`` and the ``lm:`` section of a config. The packaged example
(``metapeft/configs/text_tasks_*.jsonl``) is this script's output with its defaults.

Usage:
    python experiments/make_text_tasks.py --out-dir metapeft/configs
"""

from __future__ import annotations

import argparse
from pathlib import Path

from metapeft.lm.text_families import SPLITS, write_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--prefix", default="text_tasks")
    parser.add_argument("--tasks-per-type", type=int, default=4)
    parser.add_argument("--examples-per-task", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        path = args.out_dir / f"{args.prefix}_{split}.jsonl"
        write_split(path, split, args.tasks_per_type, args.examples_per_task, args.seed)
        print(f"{path}: {len(SPLITS[split])} task types x {args.tasks_per_type} tasks")


if __name__ == "__main__":
    main()
