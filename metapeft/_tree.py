"""Flatten and rebuild parameter trees (dicts, lists, tuples of arrays) quickly.

``mlx.utils.tree_flatten``/``tree_unflatten`` build a string path for every leaf,
which costs as much as a fused update of a small network; the fused ops use these
instead, and ``mlx.utils`` paths only to name leaves in error messages.
"""

from __future__ import annotations

from typing import Any

# A tree's structure: None for a leaf, (dict, keys, children) or (type, children).
Structure = Any


def flatten(tree: Any) -> tuple[list[Any], Structure]:
    """Leaves of ``tree`` in order, and its structure."""
    leaves: list[Any] = []
    return leaves, _walk(tree, leaves)


def leaves_like(structure: Structure, tree: Any) -> list[Any] | None:
    """Leaves of ``tree`` in the order of ``structure``; None if its structure differs.

    Dicts may hold the same keys in another order.
    """
    leaves, other = flatten(tree)
    if other == structure:
        return leaves
    leaves = []
    return leaves if _match(structure, tree, leaves) else None


def rebuild(structure: Structure, leaves: list[Any]) -> Any:
    """The tree of ``structure`` holding ``leaves``."""
    return _build(structure, iter(leaves))


def _walk(t: Any, leaves: list[Any]) -> Structure:
    if isinstance(t, dict):
        return (dict, list(t), [_walk(v, leaves) for v in t.values()])
    if isinstance(t, (list, tuple)):
        return (type(t), [_walk(v, leaves) for v in t])
    leaves.append(t)
    return None


def _match(s: Structure, t: Any, leaves: list[Any]) -> bool:
    if s is None:
        leaves.append(t)
        return True
    if s[0] is dict:
        keys = s[1]
        if not isinstance(t, dict) or len(t) != len(keys) or any(k not in t for k in keys):
            return False
        return all([_match(c, t[k], leaves) for k, c in zip(keys, s[2], strict=True)])
    children = s[1]
    if not isinstance(t, (list, tuple)) or len(t) != len(children):
        return False
    return all([_match(c, v, leaves) for c, v in zip(children, t, strict=True)])


def _build(s: Structure, it: Any) -> Any:
    if s is None:
        return next(it)
    if s[0] is dict:
        return {k: _build(c, it) for k, c in zip(s[1], s[2], strict=True)}
    return s[0]([_build(c, it) for c in s[1]])
