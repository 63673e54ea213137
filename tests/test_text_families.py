"""metapeft.lm.text_families: deterministic few-shot text tasks whose task types are
disjoint across the train, validation and test splits."""

from __future__ import annotations

import json
import random

import pytest

from metapeft.lm.text_families import SPLITS, TYPES, WORDS, task_lines, write_split


def test_the_splits_hold_disjoint_types_covering_every_type():
    seen = [set(types) for types in SPLITS.values()]
    assert all(a.isdisjoint(b) for i, a in enumerate(seen) for b in seen[i + 1 :])
    assert set().union(*seen) == set(TYPES)


def test_lines_are_deterministic_and_shaped_as_text_tasks_reads_them(tmp_path):
    a = task_lines("val", tasks_per_type=3, examples_per_task=5, seed=7)
    assert a == task_lines("val", tasks_per_type=3, examples_per_task=5, seed=7)
    assert a != task_lines("val", tasks_per_type=3, examples_per_task=5, seed=8)
    assert len(a) == len(SPLITS["val"]) * 3 * 5
    tasks = {}
    for line in a:
        assert line["prompt"].endswith(" ->") and line["completion"].startswith(" ")
        tasks.setdefault(line["task"], []).append(line["prompt"])
    assert len(tasks) == len(SPLITS["val"]) * 3
    assert all(len(set(prompts)) == 5 for prompts in tasks.values())  # distinct words
    path = write_split(tmp_path / "val.jsonl", "val", 3, 5, seed=7)
    assert [json.loads(line) for line in path.read_text().splitlines()] == a


@pytest.mark.parametrize(
    ("kind", "word", "check"),
    [
        ("reverse", "apple", lambda params, out: out == "elppa"),
        ("drop_vowels", "garden", lambda params, out: out == "grdn"),
        ("caesar", "abc", lambda params, out: len(out) == 3 and out != "abc"),
        ("has_letter", "apple", lambda params, out: out == ("yes" if params in "apple" else "no")),
        ("word_map", "apple", lambda params, out: out in params.split("/")),
        ("double_letter", "river", lambda params, out: len(out) == 6),
    ],
)
def test_rules_do_what_their_type_says(kind, word, check):
    params, rule = TYPES[kind](random.Random(0))
    assert check(params, rule(word)), (kind, params, rule(word))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="split"):
        task_lines("dev", 1, 1)
    with pytest.raises(ValueError, match="examples_per_task"):
        task_lines("train", 1, len(WORDS) + 1)
