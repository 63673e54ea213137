"""Checkpoints: trees of arrays in one safetensors file, with JSON metadata.

Files are written atomically (a temporary file in the same folder, fsync, then
rename), so a crash mid-save never damages the previous checkpoint. The metadata
carries a SHA-256 of the tensor data, so flipped bytes are caught on load
instead of being loaded as silently wrong weights.

The layout is versioned (:data:`FORMAT`): a checkpoint of this or an older layout
loads whichever metapeft version wrote it; a newer layout is refused by name.
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

FORMAT_PREFIX = "metapeft-checkpoint-"
FORMAT_VERSION = 1
FORMAT = f"{FORMAT_PREFIX}{FORMAT_VERSION}"


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
    info = _info(path, raw)
    if _checksum(flat) != info.get("checksum"):
        raise ValueError(f"{path}: checksum mismatch, the tensor data is corrupted")
    trees: dict[str, Any] = {}
    for name in info["trees"]:
        prefix = name + "."
        items = [(k[len(prefix) :], v) for k, v in flat.items() if k.startswith(prefix)]
        trees[name] = tree_unflatten(items) if items else flat.get(name, {})
    return trees, info["metadata"]


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of the checkpoint at ``path`` (what :func:`save` was given), read
    from the file's header without loading its tensors or checking their checksum.

    Raises ``FileNotFoundError`` and ``ValueError`` as :func:`load`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= path.stat().st_size - 8:
                raise ValueError(f"a header of {size} bytes")
            header = json.loads(f.read(size))
        raw = header.get("__metadata__") or {}
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: not a readable safetensors checkpoint ({e})") from None
    return _info(path, raw)["metadata"]


def _info(path: Path, raw: dict[str, str]) -> dict[str, Any]:
    """The metapeft entry of a checkpoint's safetensors metadata, checked for its format."""
    try:
        info = json.loads(raw["metapeft"])
        fmt = info["format"]
    except (KeyError, TypeError, json.JSONDecodeError):
        raise ValueError(f"{path}: not a metapeft checkpoint (no metapeft metadata)") from None
    version = fmt[len(FORMAT_PREFIX) :] if isinstance(fmt, str) else ""
    if not (isinstance(fmt, str) and fmt.startswith(FORMAT_PREFIX) and version.isdigit()):
        raise ValueError(f"{path}: unsupported checkpoint format {fmt!r}")
    if int(version) > FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format {fmt!r}, written by metapeft "
            f"{info.get('metapeft_version')}, is newer than this metapeft "
            f"({metapeft.__version__}) reads (up to {FORMAT!r}): upgrade metapeft"
        )
    return info


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
