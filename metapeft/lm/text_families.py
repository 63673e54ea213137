"""Few-shot text task families for meta-learning a language model's adapters, generated
offline and deterministically, with task *types* held out for validation and test.

A task type is a kind of rule (``caesar`` shifts letters, ``word_map`` maps words to
words, ``has_letter`` answers yes or no, ...); a task is one rule of that type drawn
with its parameters (shift 3; a random dictionary; the letter ``e``); an example is a
word and the rule's output, as ``{"task", "prompt", "completion"}`` in the JSONL format
:class:`metapeft.lm.TextTasks` reads. The types of :data:`SPLITS` are disjoint: a model
meta-trained on the ``train`` types is validated and tested on rules of kinds it never
saw, not only on new parameters of the same kinds.

Example:
    >>> lines = task_lines("train", tasks_per_type=2, examples_per_task=3, seed=0)
    >>> sorted(lines[0])
    ['completion', 'prompt', 'task']
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

from metapeft.files import atomic_write_text

__all__ = ["SPLITS", "TYPES", "task_lines", "write_split"]

WORDS = (
    "apple river stone cloud garden window silver forest candle orange planet butter "
    "meadow pencil rocket castle mirror winter summer bridge lemon tiger marble feather "
    "harbor jungle violin basket copper island anchor bottle carpet dragon engine falcon "
    "ginger helmet insect jacket kettle ladder magnet needle oyster parrot quartz rabbit "
    "saddle tunnel umbrella velvet walnut yogurt zipper blanket cactus dolphin"
).split()
VOWELS = set("aeiou")

# A task type draws one rule with `rng`: (its parameters, as text; the rule).
Rule = Callable[[str], str]
TaskType = Callable[[random.Random], tuple[str, Rule]]


def _caesar(rng: random.Random) -> tuple[str, Rule]:
    k = rng.randint(1, 25)
    shift = str.maketrans(
        string.ascii_lowercase, string.ascii_lowercase[k:] + string.ascii_lowercase[:k]
    )
    return f"k={k}", lambda w: w.translate(shift)


def _prefix(rng: random.Random) -> tuple[str, Rule]:
    p = "".join(rng.choices(string.ascii_lowercase, k=2))
    return p, lambda w: p + w


def _suffix(rng: random.Random) -> tuple[str, Rule]:
    s = "".join(rng.choices(string.ascii_lowercase, k=2))
    return s, lambda w: w + s


def _replace_letter(rng: random.Random) -> tuple[str, Rule]:
    a, b = rng.sample(sorted(VOWELS), 2)
    return f"{a}->{b}", lambda w: w.replace(a, b)


def _reverse(rng: random.Random) -> tuple[str, Rule]:
    return "", lambda w: w[::-1]


def _first_n(rng: random.Random) -> tuple[str, Rule]:
    n = rng.randint(2, 4)
    return f"n={n}", lambda w: w[:n]


def _last_n(rng: random.Random) -> tuple[str, Rule]:
    n = rng.randint(2, 4)
    return f"n={n}", lambda w: w[-n:]


def _upper_first_n(rng: random.Random) -> tuple[str, Rule]:
    n = rng.randint(1, 3)
    return f"n={n}", lambda w: w[:n].upper() + w[n:]


def _separate(rng: random.Random) -> tuple[str, Rule]:
    sep = rng.choice("-.*_+")
    return sep, lambda w: sep.join(w)


def _wrap(rng: random.Random) -> tuple[str, Rule]:
    left, right = rng.choice(["()", "[]", "{}", "<>", "**", "||"])
    return left + right, lambda w: left + w + right


def _drop_vowels(rng: random.Random) -> tuple[str, Rule]:
    return "", lambda w: "".join(c for c in w if c not in VOWELS)


def _sort_letters(rng: random.Random) -> tuple[str, Rule]:
    descending = rng.random() < 0.5
    return "desc" if descending else "asc", lambda w: "".join(sorted(w, reverse=descending))


def _word_map(rng: random.Random) -> tuple[str, Rule]:
    targets = rng.sample(["red", "blue", "green", "black", "white", "gold"], 3)
    table = {w: rng.choice(targets) for w in WORDS}
    return "/".join(targets), lambda w: table[w]


def _has_letter(rng: random.Random) -> tuple[str, Rule]:
    c = rng.choice("aeinorst")
    return c, lambda w: "yes" if c in w else "no"


def _longer_than(rng: random.Random) -> tuple[str, Rule]:
    n = rng.randint(5, 6)
    return f"n={n}", lambda w: "yes" if len(w) > n else "no"


def _count_letter(rng: random.Random) -> tuple[str, Rule]:
    c = rng.choice("aeiorn")
    return c, lambda w: str(w.count(c))


def _double_letter(rng: random.Random) -> tuple[str, Rule]:
    i = rng.randint(0, 2)
    return f"i={i}", lambda w: w[: i + 1] + w[i] + w[i + 1 :]


def _rotate(rng: random.Random) -> tuple[str, Rule]:
    k = rng.randint(1, 3)
    return f"k={k}", lambda w: w[k:] + w[:k]


TYPES: dict[str, TaskType] = {
    "caesar": _caesar,
    "prefix": _prefix,
    "suffix": _suffix,
    "replace_letter": _replace_letter,
    "reverse": _reverse,
    "first_n": _first_n,
    "last_n": _last_n,
    "upper_first_n": _upper_first_n,
    "separate": _separate,
    "wrap": _wrap,
    "drop_vowels": _drop_vowels,
    "sort_letters": _sort_letters,
    "word_map": _word_map,
    "has_letter": _has_letter,
    "longer_than": _longer_than,
    "count_letter": _count_letter,
    "double_letter": _double_letter,
    "rotate": _rotate,
}

# Disjoint task types: meta-train on the first, choose step sizes and the best
# checkpoint on the second, report on the third. Each split mixes string edits, format
# changes, word-level mappings and yes/no or counting rules.
SPLITS: dict[str, tuple[str, ...]] = {
    "train": (
        "caesar",
        "prefix",
        "replace_letter",
        "first_n",
        "upper_first_n",
        "separate",
        "word_map",
        "has_letter",
        "count_letter",
        "rotate",
    ),
    "val": ("suffix", "last_n", "wrap", "longer_than"),
    "test": ("reverse", "drop_vowels", "sort_letters", "double_letter"),
}


def task_lines(
    split: str, tasks_per_type: int, examples_per_task: int, seed: int = 0
) -> list[dict[str, Any]]:
    """The examples of ``tasks_per_type`` rules of each type of ``split``, each rule on
    ``examples_per_task`` distinct words: ``{"task", "prompt", "completion"}`` lines.

    Raises:
        ValueError: For an unknown split, or more examples per task than there are words.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if not 1 <= examples_per_task <= len(WORDS):
        raise ValueError(f"examples_per_task must be in [1, {len(WORDS)}], got {examples_per_task}")
    rng = random.Random(f"{split}-{seed}")
    lines = []
    for kind in SPLITS[split]:
        for t in range(tasks_per_type):
            params, rule = TYPES[kind](rng)
            name = f"{kind}:{params}:{t}"
            for word in rng.sample(WORDS, examples_per_task):
                lines.append({"task": name, "prompt": f"{word} ->", "completion": f" {rule(word)}"})
    return lines


def write_split(
    path: str | Path, split: str, tasks_per_type: int, examples_per_task: int, seed: int = 0
) -> Path:
    """Writes :func:`task_lines` to ``path`` as JSONL, atomically; returns the path."""
    lines = task_lines(split, tasks_per_type, examples_per_task, seed)
    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(line) + "\n" for line in lines))
    return path
