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


def sinusoid_maml(
    impl: str, model: Any, episodes: Any, inner_steps: int, inner_lr: float = 0.01
) -> Callable[[], Any]:
    """MAML on the sinusoid network as a JAX user writes it: the inner loop of one task
    under ``jax.vmap`` over the tasks, second-order gradients, bias-corrected Adam
    (1e-3), the whole step ``jax.jit``-ed with the parameters and Adam's state donated.
    ``model`` is the MLX network (a ``Sequential`` of Linear and ReLU layers) whose
    weights it starts from; the step returns the mean query loss."""
    if impl != "jax":
        raise ValueError(f"the sinusoid MAML twin exists for jax only, not {impl!r}")
    import jax
    import jax.numpy as jnp

    layers = [m for m in model.layers if hasattr(m, "weight")]
    params = [{"w": _jax(m.weight), "b": _jax(m.bias)} for m in layers]
    state = (params, jax.tree.map(jnp.zeros_like, params), jax.tree.map(jnp.zeros_like, params))

    def net(p, x):
        for i, layer in enumerate(p):
            x = x @ layer["w"].T + layer["b"]
            x = jax.nn.relu(x) if i < len(p) - 1 else x
        return x

    def loss(p, x, y):
        return jnp.mean((net(p, x) - y) ** 2)

    def task(p, sx, sy, qx, qy):
        for _ in range(inner_steps):
            g = jax.grad(loss)(p, sx, sy)
            p = jax.tree.map(lambda a, b: a - inner_lr * b, p, g)
        return loss(p, qx, qy)

    def meta_loss(p, data):
        return jax.vmap(task, in_axes=(None, 0, 0, 0, 0))(p, *data).mean()

    def step(state, data, t):
        p, m, v = state
        value, g = jax.value_and_grad(meta_loss)(p, data)
        m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m, g)
        v = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g * g, v, g)
        p = jax.tree.map(
            lambda p, m, v: p - 1e-3 * (m / (1 - 0.9**t)) / (jnp.sqrt(v / (1 - 0.999**t)) + 1e-8),
            p, m, v,
        )  # fmt: skip
        return (p, m, v), value

    f = jax.jit(step, donate_argnums=0)
    data = _jax(tuple(episodes))
    current, count = [state], [0]

    def call():
        count[0] += 1
        current[0], value = f(current[0], data, count[0])
        return jax.block_until_ready(value)

    return call


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
