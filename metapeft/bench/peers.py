"""The benchmark problems in PyTorch and JAX, timed beside the fused paths when those
libraries are installed (``pip install -e ".[peers]"``): the peers a meta-learning
researcher would otherwise reach for.

Each function takes the MLX problem of :mod:`metapeft.bench.problems`, copies it into
the peer's arrays once, and returns a function computing the same maths with the
peer's CPU kernels in their default configuration, finished before it returns.
``impl`` names the peer: ``torch`` (eager), ``torch compiled`` (``torch.compile``)
or ``jax`` (``jax.jit``). The updates are as each library's optimizers do them:
torch in place (``torch._foreach_*_``), JAX with its input buffers donated.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np

LIBRARIES = ("torch", "jax")


def installed() -> dict[str, str]:
    """The peer libraries installed here, with their versions, in the order of
    :data:`LIBRARIES`."""
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def _torch(a: mx.array, requires_grad: bool = False) -> Any:
    import torch

    return torch.from_numpy(np.array(a)).requires_grad_(requires_grad)


def _jax(tree: Any) -> Any:
    import jax

    return jax.tree.map(lambda a: jax.device_put(np.array(a)), tree)


def linear(impl: str, x: mx.array, w: mx.array) -> Callable[[], Any]:
    """``x @ w.T``."""
    if impl == "jax":
        import jax

        f = jax.jit(lambda x, w: x @ w.T)
        jx, jw = _jax((x, w))
        return lambda: f(jx, jw).block_until_ready()
    tx, tw = _torch(x), _torch(w)
    return lambda: tx @ tw.T


def lora_forward_backward(impl: str, p: dict[str, Any]) -> Callable[[], Any]:
    """Forward and gradients for ``x``, ``lora_a`` and ``lora_b`` of ``sum(out)``, per-task
    adapters.

    JAX gets the frozen weight as an argument: an array the jitted function closes
    over is a compile-time constant, and XLA would fold ``ones @ weight`` away.
    """
    scale = p["scale"]

    def loss(x, a, b, w):
        return (x @ w.T + scale * ((x @ a) @ b)).sum()

    if impl == "jax":
        import jax

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        args = _jax(tuple(p[k] for k in ("x", "lora_a", "lora_b", "weight")))
        return lambda: jax.block_until_ready(step(*args))
    import torch

    x, a, b = (_torch(p[k], requires_grad=True) for k in ("x", "lora_a", "lora_b"))
    w = _torch(p["weight"])
    f = torch.compile(loss) if impl == "torch compiled" else loss

    def step():
        value = f(x, a, b, w)
        return value, torch.autograd.grad(value, (x, a, b))

    return step


def task_sgd(impl: str, p: dict[str, Any], lr: float = 0.01) -> Callable[[], Any]:
    """``params - lr * grads`` over the tree, the result replacing ``params``."""
    if impl == "jax":
        import jax

        def step(params, grads):
            return jax.tree.map(lambda p, g: p - lr * g, params, grads)

        return _jax_donated(step, p["params"], p["grads"])
    import torch

    params = [_torch(v) for v in p["params"].values()]
    grads = [_torch(v) for v in p["grads"].values()]
    return lambda: torch._foreach_add_(params, grads, alpha=-lr)


def reptile_update(impl: str, p: dict[str, Any], epsilon: float = 0.1) -> Callable[[], Any]:
    """``meta + epsilon * (mean_T(adapted) - meta)``, the result replacing ``meta``."""
    if impl == "jax":
        import jax

        def step(meta, adapted):
            return jax.tree.map(lambda m, a: m + epsilon * (a.mean(0) - m), meta, adapted)

        return _jax_donated(step, p["meta"], p["params"])
    import torch

    meta = [_torch(v) for v in p["meta"].values()]
    adapted = [_torch(v) for v in p["params"].values()]
    return lambda: torch._foreach_lerp_(meta, [a.mean(0) for a in adapted], epsilon)


def _jax_donated(step: Callable[[Any, Any], Any], state: Any, other: Any) -> Callable[[], Any]:
    """Each call replaces ``state`` by ``step(state, other)``, jitted with the buffers
    of ``state`` donated to the result."""
    import jax

    f = jax.jit(step, donate_argnums=0)
    current, other = [_jax(state)], _jax(other)

    def call():
        current[0] = jax.block_until_ready(f(current[0], other))
        return current[0]

    return call
