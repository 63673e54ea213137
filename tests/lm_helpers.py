"""Tiny mlx-lm models and a learnable family of text tasks for the tests of metapeft.lm."""

from __future__ import annotations

import json
import random
from pathlib import Path

ALPHABET = "abcdefgh"


def substitution_tasks(path: Path, num_tasks: int = 6, per_task: int = 8, seed: int = 0) -> Path:
    """A JSONL of prompt/completion tasks: each task is a letter substitution applied to
    a three-letter word (``"abc>" -> "hge"``)."""
    rng = random.Random(seed)
    lines = []
    for t in range(num_tasks):
        key = {c: rng.choice(ALPHABET) for c in ALPHABET}
        for _ in range(per_task):
            word = "".join(rng.choice(ALPHABET) for _ in range(3))
            lines.append(
                {"task": f"t{t}", "prompt": word + ">", "completion": "".join(key[c] for c in word)}
            )
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path
