"""Gradient checkpointing of transformer blocks: activations inside a block are
recomputed in the backward pass instead of kept, so the inner loop's memory grows
with the number of blocks' inputs, not with every intermediate of every block."""

from __future__ import annotations

from functools import cache

import mlx.core as mx
import mlx.nn as nn

__all__ = ["checkpoint_blocks"]


@cache
def _checkpointed(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of ``cls`` whose call runs under ``mx.checkpoint``."""

    def __call__(self, *args, **kwargs):
        def run(params, *args, **kwargs):
            self.update(params)
            return cls.__call__(self, *args, **kwargs)

        return mx.checkpoint(run)(self.trainable_parameters(), *args, **kwargs)

    return type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__, "checkpointed": True})


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """Makes every block of ``model.layers`` recompute its activations in the backward
    pass (``mx.checkpoint``); returns ``model``.

    Only these block instances change (each becomes an instance of a subclass of
    its own class); parameters, their paths and the results stay the same, and
    other models of the same class are not affected. MLX 0.32 cannot ``vmap``
    through ``mx.checkpoint``: run meta-learners with ``batched=False``.

    Example:
        >>> model = checkpoint_blocks(model)
    """
    if not hasattr(model, "layers"):
        raise ValueError("the model has no 'layers' (transformer blocks) to checkpoint")
    for block in model.layers:
        if not getattr(block, "checkpointed", False):
            block.__class__ = _checkpointed(type(block))
    return model
