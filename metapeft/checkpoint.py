"""Checkpoints: trees of arrays in one safetensors file, with JSON metadata.

Files are written atomically (a temporary file in the same folder, fsync, then
rename), so a crash mid-save never damages the previous checkpoint. The metadata
carries a SHA-256 of the tensor data, so flipped bytes are caught on load
instead of being loaded as silently wrong weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

import metapeft
from metapeft.files import atomic_write

FORMAT = "metapeft-checkpoint-1"


def save(path: str | Path, trees: dict[str, Any], metadata: dict[str, Any]) -> None:
    """Writes ``trees`` (name -> tree of arrays) and JSON-serialisable ``metadata`` to ``path``.

    Example:
        >>> save("ckpt.safetensors", {"meta": {"w": mx.ones(3)}}, {"step": 1})
    """
    path = Path(path)
    flat = {
        f"{name}.{key}" if key else name: value
        for name, tree in trees.items()
        for key, value in tree_flatten(tree)
    }
    info = {
        "format": FORMAT,
        "metapeft_version": metapeft.__version__,
        "trees": sorted(trees),
        "checksum": _checksum(flat),
        "metadata": metadata,
    }
    meta = {"metapeft": json.dumps(info)}
    atomic_write(path, lambda tmp: mx.save_safetensors(str(tmp), flat, metadata=meta))


def save_npz(path: str | Path, tree: Any) -> None:
    """Writes a tree of arrays to ``path`` as ``.npz``, flat keys (``layers.0.weight``), atomically.

    ``model.load_weights(path)`` reads it back (``strict=False`` for a part of a model).

    Example:
        >>> save_npz("best.npz", model.trainable_parameters())  # doctest: +SKIP
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: an .npz file name must end in .npz")
    arrays = dict(tree_flatten(tree))
    atomic_write(path, lambda tmp: mx.savez(str(tmp), **arrays))


def load(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads a checkpoint written by :func:`save`: ``(trees, metadata)``.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the
    file for anything unreadable, foreign or corrupted.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        flat, raw = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception as e:  # MLX raises several types for a damaged file
        raise ValueError(f"{path}: not a readable safetensors checkpoint ({e})") from None
    try:
        info = json.loads(raw["metapeft"])
    except (KeyError, json.JSONDecodeError):
        raise ValueError(f"{path}: not a metapeft checkpoint (no metapeft metadata)") from None
    if info.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {info.get('format')!r}")
    if info.get("metapeft_version") != metapeft.__version__:
        raise ValueError(
            f"{path}: written by metapeft {info.get('metapeft_version')}, "
            f"this is metapeft {metapeft.__version__}"
        )
    if _checksum(flat) != info.get("checksum"):
        raise ValueError(f"{path}: checksum mismatch, the tensor data is corrupted")
    trees: dict[str, Any] = {}
    for name in info["trees"]:
        prefix = name + "."
        items = [(k[len(prefix) :], v) for k, v in flat.items() if k.startswith(prefix)]
        trees[name] = tree_unflatten(items) if items else flat.get(name, {})
    return trees, info["metadata"]


def check_like(path: str | Path, name: str, loaded: Any, expected: Any) -> None:
    """Raises ValueError naming the file unless ``loaded`` has ``expected``'s keys and shapes."""
    got = {k: v.shape for k, v in tree_flatten(loaded)}
    want = {k: v.shape for k, v in tree_flatten(expected)}
    if got == want:
        return
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    shapes = [
        f"{k}: {got[k]} vs {want[k]}" for k in sorted(set(got) & set(want)) if got[k] != want[k]
    ]
    raise ValueError(
        f"{path}: checkpoint '{name}' does not match this model "
        f"(missing {missing}, unexpected {extra}, shape mismatches {shapes})"
    )


def _checksum(flat: dict[str, mx.array]) -> str:
    h = hashlib.sha256()
    for key in sorted(flat):
        value = flat[key]
        h.update(key.encode())
        h.update(str(value.dtype).encode())
        h.update(str(value.shape).encode())
        data = value.view(mx.uint16) if value.dtype == mx.bfloat16 else value
        h.update(np.ascontiguousarray(np.array(data)).tobytes())
    return h.hexdigest()
