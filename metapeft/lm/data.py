"""Text tasks from JSONL, as mlx-lm's LoRA trainer reads them, grouped by task.

Each line is ``{"task": ..., "text": ...}`` or ``{"task": ..., "prompt": ...,
"completion": ...}``. A meta-batch is an :class:`metapeft.tasks.Episodes` whose
``x`` holds input tokens and ``y`` the next-token targets, ``(T, n, L)`` int32;
targets equal to :data:`IGNORE` (padding, and the prompt of a prompt/completion
example) do not count in :func:`lm_loss`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from metapeft import ops
from metapeft.nn.fast import output_layer
from metapeft.tasks import Episodes
from metapeft.tasks.distribution import SeededSampler

__all__ = [
    "IGNORE",
    "TextExample",
    "TextTasks",
    "lm_loss",
    "read_jsonl",
    "tokenize",
    "trainer_loss",
]

IGNORE = -100  # target id that the loss skips


@dataclass(frozen=True)
class TextExample:
    """One tokenised example: ``tokens`` and the index of the first token the loss
    counts (``offset``: 0 for text, the prompt's length for prompt/completion)."""

    tokens: tuple[int, ...]
    offset: int
    line: int


def read_jsonl(path: str | Path) -> dict[str, list[tuple[int, dict[str, str]]]]:
    """Reads a task JSONL file: task name -> ``[(line number, record), ...]``.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: Naming ``file:line`` for a line that is not a JSON object, has
            no ``task``, or has neither a non-empty ``text`` nor ``prompt`` and
            ``completion`` strings.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such task file")
    tasks: dict[str, list[tuple[int, dict[str, str]]]] = {}
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            task = record.get("task")
            if not isinstance(task, (str, int)) or task == "":
                raise ValueError(f'{where}: no "task" field (a name or id of the task)')
            if "text" in record:
                if not isinstance(record["text"], str) or not record["text"]:
                    raise ValueError(f'{where}: "text" must be a non-empty string')
            elif "prompt" in record or "completion" in record:
                for key in ("prompt", "completion"):
                    if not isinstance(record.get(key), str):
                        raise ValueError(f'{where}: "{key}" must be a string')
                if not record["completion"]:
                    raise ValueError(f'{where}: "completion" is empty')
            else:
                raise ValueError(
                    f'{where}: no text: each line needs "text", or "prompt" and "completion" '
                    f"(keys found: {sorted(record)})"
                )
            tasks.setdefault(str(task), []).append((number, record))
    if not tasks:
        raise ValueError(f"{path}: no examples (the file is empty)")
    return tasks


def tokenize(tokenizer: Any, record: dict[str, str], line: int = 0) -> TextExample:
    """Tokenises one record as mlx-lm's trainer does.

    Text: its tokens, with the end-of-sequence token appended if missing.
    Prompt/completion: through the tokenizer's chat template when it has one (a
    user and an assistant message, the prompt being the user turn with the
    generation prompt), else the prompt's tokens followed by the completion's and
    the end-of-sequence token; the loss counts the completion only.
    """
    eos = tokenizer.eos_token_id
    if "text" in record:
        tokens = list(tokenizer.encode(record["text"]))
        offset = 0
    elif getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]},
        ]
        tokens = list(tokenizer.apply_chat_template(messages, return_dict=False))
        offset = len(
            tokenizer.apply_chat_template(
                messages[:1], add_generation_prompt=True, return_dict=False
            )
        )
    else:
        prompt = list(tokenizer.encode(record["prompt"]))
        tokens = prompt + list(tokenizer.encode(record["completion"], add_special_tokens=False))
        offset = len(prompt)
    if not tokens or tokens[-1] != eos:
        tokens.append(eos)
    return TextExample(tuple(int(t) for t in tokens), offset, line)


class TextTasks(SeededSampler):
    """A distribution over text tasks: each sampled task gives a support and a query
    set of its own examples, drawn without replacement.

    Sequences are padded to one length ``L`` (the longest example minus one, at most
    ``max_seq_length``) so that every meta-batch stacks and compiles to one shape.

    Args:
        tasks: Task name -> tokenised examples.
        support_size: Support examples per task.
        query_size: Query examples per task.
        pad_id: Token id used to pad inputs.
        max_seq_length: Longest sequence kept, in tokens (longer ones are cut).
        seed: Seed of the sampler.
        source: Where the tasks come from, for error messages.

    Raises:
        ValueError: If a task has fewer than ``support_size + query_size`` examples
            (naming the task, its count and ``source``), or a size is not >= 1.

    Example:
        >>> tasks = TextTasks.from_jsonl("tasks.jsonl", tokenizer, support_size=4, query_size=4)
        >>> episodes = tasks.sample(2)
        >>> loss = lm_loss(model, episodes.support_x[0], episodes.support_y[0])
    """

    def __init__(
        self,
        tasks: dict[str, list[TextExample]],
        support_size: int,
        query_size: int,
        pad_id: int,
        max_seq_length: int = 2048,
        seed: int = 0,
        source: str = "tasks",
    ) -> None:
        for name, value in (
            ("support_size", support_size),
            ("query_size", query_size),
            ("max_seq_length", max_seq_length),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not tasks:
            raise ValueError(f"{source}: no tasks")
        need = support_size + query_size
        small = {name: len(ex) for name, ex in tasks.items() if len(ex) < need}
        if small:
            shown = ", ".join(f"{n!r} has {c}" for n, c in sorted(small.items())[:10])
            raise ValueError(
                f"{source}: {len(small)} task(s) have fewer examples than support_size + "
                f"query_size = {support_size} + {query_size} = {need}: {shown}"
            )
        self.tasks = tasks
        self.names = sorted(tasks)
        self.support_size, self.query_size = support_size, query_size
        self.pad_id = int(pad_id)
        self.source = source
        longest = max(len(e.tokens) for ex in tasks.values() for e in ex)
        if longest - 1 > max_seq_length:
            cut = sum(len(e.tokens) - 1 > max_seq_length for ex in tasks.values() for e in ex)
            warnings.warn(
                f"{source}: {cut} example(s) are longer than max_seq_length={max_seq_length} "
                f"tokens (longest {longest}); they are cut",
                stacklevel=2,
            )
        self.seq_length = min(longest - 1, max_seq_length)
        self.rng = np.random.default_rng(seed)

    @classmethod
    def from_jsonl(
        cls,
        path: str | Path,
        tokenizer: Any,
        support_size: int,
        query_size: int,
        max_seq_length: int = 2048,
        seed: int = 0,
    ) -> TextTasks:
        """Reads and tokenises ``path`` (see :func:`read_jsonl` and :func:`tokenize`)."""
        records = read_jsonl(path)
        tasks = {
            name: [tokenize(tokenizer, record, line) for line, record in lines]
            for name, lines in records.items()
        }
        for name, examples in tasks.items():
            for e in examples:
                if len(e.tokens) < 2:
                    raise ValueError(f"{path}:{e.line}: too short to predict a token ({name!r})")
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = tokenizer.eos_token_id if pad is None else pad
        return cls(tasks, support_size, query_size, pad, max_seq_length, seed, str(path))

    def subset(self, names: Sequence[str], seed: int | None = None) -> TextTasks:
        """The distribution over the tasks ``names`` only (same sizes and padding)."""
        missing = [n for n in names if n not in self.tasks]
        if missing:
            raise ValueError(f"{self.source}: unknown task(s) {missing}")
        new = TextTasks.__new__(TextTasks)
        new.__dict__.update(self.__dict__)
        new.tasks = {n: self.tasks[n] for n in names}
        new.names = sorted(names)
        new.rng = np.random.default_rng(seed) if seed is not None else self.rng
        return new

    def encode(self, examples: Sequence[TextExample]) -> tuple[np.ndarray, np.ndarray]:
        """Padded inputs and targets ``(n, L)`` for ``examples``."""
        n, length = len(examples), self.seq_length
        x = np.full((n, length), self.pad_id, dtype=np.int32)
        y = np.full((n, length), IGNORE, dtype=np.int32)
        for i, e in enumerate(examples):
            tokens = np.asarray(e.tokens[: length + 1], dtype=np.int32)
            k = len(tokens) - 1
            x[i, :k] = tokens[:-1]
            y[i, :k] = tokens[1:]
            y[i, : max(e.offset - 1, 0)] = IGNORE  # targets inside the prompt
        return x, y

    def task_episode(self, name: str) -> tuple[np.ndarray, ...]:
        """One task's ``(support_x, support_y, query_x, query_y)``, freshly drawn."""
        examples = self.tasks[name]
        order = self.rng.permutation(len(examples))[: self.support_size + self.query_size]
        chosen = [examples[i] for i in order]
        sx, sy = self.encode(chosen[: self.support_size])
        qx, qy = self.encode(chosen[self.support_size :])
        return sx, sy, qx, qy

    def sample(self, num_tasks: int) -> Episodes:
        """``num_tasks`` tasks drawn uniformly (with replacement across meta-batches,
        without within one when there are enough tasks)."""
        replace = num_tasks > len(self.names)
        picks = self.rng.choice(len(self.names), size=num_tasks, replace=replace)
        parts = [self.task_episode(self.names[i]) for i in picks]
        return Episodes(*(mx.array(np.stack(p)) for p in zip(*parts, strict=True)))


def lm_loss(model: nn.Module, x: mx.array, y: mx.array) -> mx.array:
    """Mean next-token cross-entropy of ``model(x)`` over the targets ``y`` that are not
    :data:`IGNORE` (MLX's ``loss_fn(model, x, y)`` convention; float32). For mlx-lm's
    Llama-family models it never holds the logits (:func:`metapeft.ops.linear_cross_entropy`).

    Example:
        >>> loss = lm_loss(model, mx.array([[5, 6, 7]]), mx.array([[6, 7, -100]]))
    """
    mask = y != IGNORE
    targets = mx.where(mask, y, 0)
    split = output_layer(model)
    if split is None:
        ce = ops.cross_entropy(model(x), targets)
    else:
        body, weight = split
        ce = ops.linear_cross_entropy(body(x), weight, targets)
    ce = ce * mask
    return ce.sum() / mx.maximum(mask.sum(), 1)


def trainer_loss(model: nn.Module, batch: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
    """mlx-lm's ``default_loss`` through :func:`lm_loss`: the same value and token count
    from the same ``(batch, lengths)`` (``lengths[:, 0]`` where each completion starts,
    ``lengths[:, 1]`` where it ends, as mlx-lm's ``iterate_batches`` gives them), without
    holding the logits. For ``mlx_lm.tuner.train(..., loss=trainer_loss)``.
    """
    inputs, targets = batch[:, :-1], batch[:, 1:]
    steps = mx.arange(1, targets.shape[1] + 1)
    mask = (steps >= lengths[:, 0:1]) & (steps <= lengths[:, 1:])
    return lm_loss(model, inputs, mx.where(mask, targets, IGNORE)), mask.sum()
