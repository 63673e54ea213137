"""Module surgery shared by the layers of :mod:`metapeft.nn`: bare construction,
carrying freeze and training state from one layer to its replacement, and swapping
modules of a model in place by their dotted paths."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

M = TypeVar("M", bound=nn.Module)


def bare(cls: type[M]) -> M:
    """An instance of the module class ``cls`` with no attributes yet.

    Layers built from existing arrays use it instead of ``cls(...)``, whose
    ``__init__`` would draw random weights (lazily, but consuming MLX's global key).
    """
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    return module


def frozen_keys(module: nn.Module) -> list[str]:
    """The names of the module's own arrays that are frozen (not its children's)."""
    trainable = module.trainable_parameters()
    return [k for k, v in module.items() if isinstance(v, mx.array) and k not in trainable]


def carry_state(src: nn.Module, dst: M, keys: dict[str, str] | None = None) -> M:
    """Gives ``dst`` the training mode of ``src`` and freezes each array of ``dst``
    whose counterpart in ``src`` is frozen; ``keys`` maps names in ``src`` to names in
    ``dst`` (default: the same name)."""
    keys = keys if keys is not None else {k: k for k in src if isinstance(src[k], mx.array)}
    frozen = [keys[k] for k in frozen_keys(src) if k in keys and keys[k] in dst]
    if frozen:
        dst.freeze(recurse=False, keys=frozen)
    dst.train(src.training)
    return dst


def replace_modules(
    model: nn.Module, replacement: Callable[[nn.Module], nn.Module | None], paths: set[str]
) -> nn.Module:
    """Replaces, in place, each module of ``model`` found at one of ``paths`` (dotted,
    as in ``model.named_modules()``) by ``replacement(module)`` (None: keep it).

    A module reachable from several paths (a shared layer) is replaced once, by one
    new module, at all of them, so sharing survives. Returns the model, or the
    replacement of the model itself when ``""`` is in ``paths``.
    """
    named = model.named_modules()
    chosen = {id(m) for p, m in named if p in paths}
    new: dict[int, nn.Module | None] = {}
    swaps = []
    for path, module in named:
        if id(module) not in chosen:
            continue
        if id(module) not in new:
            new[id(module)] = replacement(module)
        if new[id(module)] is not None:
            swaps.append((path, new[id(module)]))
    for path, module in swaps:
        if path == "":
            return module
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return model
