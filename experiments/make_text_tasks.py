"""Writes ``metapeft/configs/text_tasks.jsonl``, the packaged example of text tasks: a
few string transformations a small pretrained model learns from examples (reverse a
word, upper-case it, its first letters, ...), deterministic for a seed.

Usage:
    python experiments/make_text_tasks.py --out metapeft/configs/text_tasks.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = (
    "apple river stone cloud garden window silver forest candle orange planet "
    "butter meadow pencil rocket castle mirror winter summer bridge lemon tiger "
    "marble feather harbor jungle violin basket copper island"
).split()

TASKS = {
    "reverse": lambda w: w[::-1],
    "upper": str.upper,
    "first_three": lambda w: w[:3],
    "last_letter": lambda w: w[-1],
    "double": lambda w: w + w,
    "vowels": lambda w: "".join(c for c in w if c in "aeiou"),
    "length": lambda w: str(len(w)),
    "capitalise_last": lambda w: w[:-1] + w[-1].upper(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-task", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    lines = []
    for name, fn in TASKS.items():
        for word in rng.sample(WORDS, args.per_task):
            lines.append({"task": name, "prompt": f"{word} ->", "completion": f" {fn(word)}"})
    args.out.write_text("".join(json.dumps(line) + "\n" for line in lines))


if __name__ == "__main__":
    main()
