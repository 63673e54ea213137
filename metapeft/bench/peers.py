"""The benchmark problems in PyTorch, timed beside the fused paths when torch is
installed (``pip install -e ".[peers]"``): the peer library a meta-learning
researcher would otherwise reach for.

Each function takes the MLX problem of :mod:`metapeft.bench.problems`, copies it
into torch tensors once, and returns a function computing the same maths with
torch's CPU kernels (MKL, OpenMP) in their default configuration. The updates are
in place (``torch._foreach_*_``), as ``torch.optim`` does them.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np


def torch_version() -> str | None:
    """The installed torch's version, or None when torch is not installed."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def _tensor(a: mx.array, requires_grad: bool = False) -> Any:
    import torch

    return torch.from_numpy(np.array(a)).requires_grad_(requires_grad)


def linear(x: mx.array, w: mx.array) -> Callable[[], Any]:
    """``x @ w.T``."""
    tx, tw = _tensor(x), _tensor(w)
    return lambda: tx @ tw.T


def lora_forward_backward(p: dict[str, Any], compiled: bool = False) -> Callable[[], Any]:
    """Forward and gradients for ``x``, ``lora_a`` and ``lora_b`` of ``sum(out)``, per-task
    adapters, by autograd; under ``torch.compile`` (inductor) when ``compiled``."""
    import torch

    x, a, b = (_tensor(p[k], requires_grad=True) for k in ("x", "lora_a", "lora_b"))
    w, scale = _tensor(p["weight"]), p["scale"]

    def loss(x, a, b):
        return (x @ w.T + scale * ((x @ a) @ b)).sum()

    f = torch.compile(loss) if compiled else loss

    def step():
        value = f(x, a, b)
        return value, torch.autograd.grad(value, (x, a, b))

    return step


def task_sgd(p: dict[str, Any], lr: float = 0.01) -> Callable[[], Any]:
    """``params -= lr * grads`` over the tree, in place (``torch._foreach_add_``)."""
    import torch

    params = [_tensor(v) for v in p["params"].values()]
    grads = [_tensor(v) for v in p["grads"].values()]
    return lambda: torch._foreach_add_(params, grads, alpha=-lr)


def reptile_update(p: dict[str, Any], epsilon: float = 0.1) -> Callable[[], Any]:
    """``meta += epsilon * (mean_T(adapted) - meta)``, in place (``torch._foreach_lerp_``)."""
    import torch

    meta = [_tensor(v) for v in p["meta"].values()]
    adapted = [_tensor(v) for v in p["params"].values()]
    return lambda: torch._foreach_lerp_(meta, [a.mean(0) for a in adapted], epsilon)
