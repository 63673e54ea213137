"""Stock-MLX twins of the fast paths, for the benchmarks to compare against.

- :func:`mlx_vmap_compile_maml`: MAML written the plain MLX way (``mx.vmap`` over
  tasks, ``tree_map`` SGD, the whole step in ``mx.compile``) on stock layers.
- :class:`StockLoRALinear`: a LoRA layer computed by :func:`metapeft.reference.lora_linear`
  (stock matmuls), for the naive per-task loop on a LoRA model.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from metapeft import reference


def mlx_vmap_compile_maml(model: nn.Module, loss_fn, inner_lr: float, inner_steps: int):
    """A compiled MAML meta-step ``step(sx, sy, qx, qy) -> loss`` in plain MLX."""
    optimizer = optim.Adam(1e-3, bias_correction=True)
    optimizer.init(model.trainable_parameters())

    def meta_loss(params, sx, sy, qx, qy):
        def task(sx, sy, qx, qy):
            p = params
            for _ in range(inner_steps):

                def support_loss(p):
                    model.update(p)
                    return loss_fn(model, sx, sy)

                p = tree_map(lambda a, g: a - inner_lr * g, p, mx.grad(support_loss)(p))
            model.update(p)
            return loss_fn(model, qx, qy)

        return mx.vmap(task)(sx, sy, qx, qy).mean()

    value_and_grad = mx.value_and_grad(meta_loss)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(sx, sy, qx, qy):
        params = model.trainable_parameters()
        loss, grads = value_and_grad(params, sx, sy, qx, qy)
        model.update(params)
        optimizer.update(model, grads)
        return loss

    return step, state


class StockLoRALinear(nn.Module):
    """``x @ W.T + b + scale * (x @ lora_a) @ lora_b`` with stock MLX ops; base frozen."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float = 16.0) -> None:
        super().__init__()
        self.weight = mx.random.normal((d_out, d_in)) / d_in**0.5
        self.lora_a = mx.random.uniform(-(d_in**-0.5), d_in**-0.5, (d_in, rank))
        self.lora_b = mx.zeros((rank, d_out))
        self.scale = alpha / rank
        self.freeze(keys=["weight"])

    def __call__(self, x: mx.array) -> mx.array:
        return reference.lora_linear(x, self.weight, self.lora_a, self.lora_b, self.scale)
