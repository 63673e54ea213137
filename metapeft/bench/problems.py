"""The benchmark problems, built in one place for asv, pytest-benchmark and
``metapeft bench``: the fused paths, their pure-MLX references, and the stock-MLX
baselines (plain ``vmap`` + ``compile`` MAML, a naive per-task loop on stock layers).

Sizes are arguments; :data:`TINY` (``METAPEFT_BENCH_SIZE=tiny``) lets test runs
shrink them to check that every benchmark body runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from metapeft import ops, reference
from metapeft.bench import peers
from metapeft.learners import registry
from metapeft.learners.base import MetaLearner
from metapeft.nn import LoRALinear
from metapeft.tasks import Episodes, TaskConfig, TaskDistribution

TINY = os.environ.get("METAPEFT_BENCH_SIZE") == "tiny"

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def size(full: Any, tiny: Any) -> Any:
    """``tiny`` when ``METAPEFT_BENCH_SIZE=tiny``, else ``full``."""
    return tiny if TINY else full


def mse(model: nn.Module, x: mx.array, y: mx.array) -> mx.array:
    """Mean squared error of ``model(x)`` against ``y``."""
    return nn.losses.mse_loss(model(x), y)


def _normal(shape: tuple[int, ...], seed: int, dtype: mx.Dtype = mx.float32, std=1.0):
    return (mx.random.normal(shape, key=mx.random.key(seed)) * std).astype(dtype)


# --------------------------------------------------------------------- primitives
def linear_problem(rows: int, dim: int, dtype: str = "float32") -> tuple[mx.array, mx.array]:
    """``x (rows, dim)`` and ``weight (dim, dim)``, evaluated."""
    x, w = _normal((rows, dim), 0, DTYPES[dtype]), _normal((dim, dim), 1, DTYPES[dtype], 0.02)
    mx.eval(x, w)
    return x, w


def lora_problem(
    tasks: int, rows: int, dim: int, rank: int, dtype: str = "float32"
) -> dict[str, Any]:
    """Inputs of ``lora_linear``: per-task adapters when ``tasks > 0``, else one adapter."""
    dt = DTYPES[dtype]
    lead = (tasks,) if tasks else ()
    p = {
        "x": _normal((*lead, rows, dim), 2, dt),
        "weight": _normal((dim, dim), 3, dt, 0.02),
        "lora_a": _normal((*lead, dim, rank), 4, dt, 0.02),
        "lora_b": _normal((*lead, rank, dim), 5, dt, 0.02),
        "scale": 2.0,
    }
    mx.eval(p)
    return p


def lora_forward(impl: str, p: dict[str, Any]) -> Callable[[], mx.array]:
    """``lora_linear`` forward by ``impl`` (``fused`` or ``reference``)."""
    f = (ops if impl == "fused" else reference).lora_linear
    return lambda: f(p["x"], p["weight"], p["lora_a"], p["lora_b"], p["scale"])


def lora_forward_backward(impl: str, p: dict[str, Any]) -> Callable[[], Any]:
    """Forward and gradients for ``x``, ``lora_a`` and ``lora_b`` of ``sum(out)``."""
    f = (ops if impl == "fused" else reference).lora_linear
    w, scale = p["weight"], p["scale"]
    step = mx.value_and_grad(lambda x, a, b: f(x, w, a, b, scale).sum(), argnums=(0, 1, 2))
    return lambda: step(p["x"], p["lora_a"], p["lora_b"])


def numpy_lora_forward_backward(p: dict[str, Any]) -> Callable[[], Any]:
    """The same maths by hand in numpy (OpenBLAS), for per-task adapters."""
    x, w, a, b = (np.array(p[k]) for k in ("x", "weight", "lora_a", "lora_b"))
    scale = p["scale"]

    def run():
        h = x @ a
        out = x @ w.T + scale * (h @ b)
        g = np.ones_like(out)
        gb = g @ b.transpose(0, 2, 1)
        dx = g @ w + scale * (gb @ a.transpose(0, 2, 1))
        da = scale * (x.transpose(0, 2, 1) @ gb)
        db = scale * (h.transpose(0, 2, 1) @ g)
        return out.sum(), dx, da, db

    return run


# Parameter trees of the update benchmarks: leaf shapes per task.
TREES = {
    # Sinusoid MAML (1-40-40-1): 1,761 parameters per task, 6 arrays.
    "sinusoid": [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)],
    # A LoRA-sized tree: 65,536 parameters per task in 8 arrays.
    "lora": [(size(8192, 8),)] * 8,
    # LoRA adapters (r=8) on q and v of a 24-layer d=256 model: 96 arrays, 196,608
    # per task. More leaves than one primitive takes, as in a language model.
    "lm": [(size(256, 16), 8), (8, size(256, 16))] * 48,
}
# The tasks of each tree's meta-batch in the update benchmarks.
TREE_TASKS = {"sinusoid": 25, "lora": 16, "lm": 8}


def update_problem(tasks: int, tree: str, dtype: str = "float32") -> dict[str, Any]:
    """Per-task ``params`` and ``grads`` trees, and ``meta`` (task 0 of params)."""
    shapes, dt = TREES[tree], DTYPES[dtype]
    params = {f"p{i}": _normal((tasks, *s), 10 + i, dt) for i, s in enumerate(shapes)}
    grads = {f"p{i}": _normal((tasks, *s), 30 + i, dt) for i, s in enumerate(shapes)}
    meta = {k: v[0] for k, v in params.items()}
    mx.eval(params, grads, meta)
    return {"params": params, "grads": grads, "meta": meta}


def task_sgd_fn(impl: str) -> Callable[[Any, Any], Any]:
    """``task_sgd`` with lr 0.01: ``fused`` or ``reference``, each also ``... compiled``."""
    f = ops.task_sgd if impl.startswith("fused") else reference.task_sgd
    fn = partial(f, lr=0.01)
    return mx.compile(fn) if impl.endswith("compiled") else fn


def reptile_update_fn(impl: str) -> Callable[[Any, Any], Any]:
    """``reptile_update`` with epsilon 0.1, named like :func:`task_sgd_fn`."""
    f = ops.reptile_update if impl.startswith("fused") else reference.reptile_update
    fn = partial(f, epsilon=0.1)
    return mx.compile(fn) if impl.endswith("compiled") else fn


# ----------------------------------------------------------------------- learners
ALGORITHMS = tuple(registry.ALGORITHMS)


def make_learner(
    algorithm: str, model: nn.Module, *, inner_steps: int, batched: bool, inner_lr: float = 0.01
) -> MetaLearner:
    """A learner of ``algorithm`` (one of :data:`ALGORITHMS`) with Adam outer steps; the
    batched one on metapeft's fast layers, the naive loop on the model's own."""
    cls = registry.get_algorithm(algorithm)
    return cls(model, inner_lr=inner_lr, inner_steps=inner_steps, batched=batched, fast=batched)


def sinusoid_net(seed: int = 0) -> nn.Module:
    """The 1-40-40-1 ReLU network of the MAML paper, plain ``mlx.nn`` layers."""
    mx.random.seed(seed)
    model = nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )
    mx.eval(model.parameters())
    return model


def sinusoid_episodes(tasks: int, shots: int = 10) -> Episodes:
    """A sinusoid meta-batch of ``tasks`` tasks with ``shots`` support and query points."""
    config = TaskConfig("sine", "sinusoid", 0, 1, support_size=shots, query_size=shots)
    episodes = TaskDistribution(config, seed=0).sample(tasks)
    mx.eval(episodes.support_x, episodes.support_y, episodes.query_x, episodes.query_y)
    return episodes


class StockLoRALinear(nn.Module):
    """``x @ W.T + scale * (x @ lora_a) @ lora_b`` with stock MLX ops; base frozen."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float = 16.0) -> None:
        super().__init__()
        self.weight = mx.random.normal((d_out, d_in)) / d_in**0.5
        self.lora_a = mx.random.uniform(-(d_in**-0.5), d_in**-0.5, (d_in, rank))
        self.lora_b = mx.zeros((rank, d_out))
        self.scale = alpha / rank
        self.freeze(keys=["weight"])

    def __call__(self, x: mx.array) -> mx.array:
        return reference.lora_linear(x, self.weight, self.lora_a, self.lora_b, self.scale)


def lora_net(dim: int, rank: int, layers: int, *, fused: bool, seed: int = 0) -> nn.Module:
    """``layers`` square LoRA layers (ReLU between), base frozen, adapters trainable:
    :class:`metapeft.nn.LoRALinear` when ``fused``, else :class:`StockLoRALinear`."""
    mx.random.seed(seed)
    stack = []
    for i in range(layers):
        layer = (
            LoRALinear.from_base(nn.Linear(dim, dim, bias=False), rank)
            if fused
            else StockLoRALinear(dim, dim, rank)
        )
        stack += [layer, nn.ReLU()] if i < layers - 1 else [layer]
    model = nn.Sequential(*stack)
    model.freeze()
    model.unfreeze(keys=["lora_a", "lora_b"])
    mx.eval(model.parameters())
    return model


def lora_episodes(tasks: int, rows: int, dim: int, seed: int = 0) -> Episodes:
    """Random regression episodes of ``rows`` rows per task, evaluated."""
    rng = np.random.default_rng(seed)
    arrays = [
        mx.array(rng.standard_normal((tasks, rows, dim)).astype(np.float32)) for _ in range(4)
    ]
    mx.eval(arrays)
    return Episodes(*arrays)


def mlx_vmap_compile_maml(model: nn.Module, loss_fn, inner_lr: float, inner_steps: int):
    """MAML written the plain MLX way: ``mx.vmap`` over tasks, ``tree_map`` SGD and the
    whole step in ``mx.compile``, on stock layers. Returns ``(step, state)``, where
    ``step(episodes) -> loss``; evaluate ``state`` with the loss."""
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
    def compiled(sx, sy, qx, qy):
        params = model.trainable_parameters()
        loss, grads = value_and_grad(params, sx, sy, qx, qy)
        model.update(params)
        optimizer.update(model, grads)
        return loss

    def step(episodes: Episodes) -> mx.array:
        return compiled(episodes.support_x, episodes.support_y, episodes.query_x, episodes.query_y)

    return step, state


def meta_step(
    problem: str, algorithm: str, impl: str, *, tasks: int, inner_steps: int, **lora: int
) -> Callable[[], Any]:
    """One meta-training step, ready to time (each call evaluates its result).

    Args:
        problem: ``sinusoid``, ``lora`` (then ``dim``, ``rank``, ``layers``, ``rows``) or
            ``lm`` (then ``dim``, ``layers``; see :func:`lm_meta_step`).
        algorithm: One of :data:`ALGORITHMS`.
        impl: ``fused`` (batched learner, which puts the model on metapeft's fast
            layers), ``naive`` (a Python loop over tasks on stock layers) or, for MAML
            on sinusoid, ``mlx`` (plain MLX ``vmap`` + ``compile``) and ``jax``
            (:func:`metapeft.bench.peers.sinusoid_maml`).
        tasks: Tasks per meta-batch.
        inner_steps: Inner SGD steps per task.
    """
    if problem == "lm":
        return lm_meta_step(algorithm, impl, tasks=tasks, inner_steps=inner_steps, **lora)
    if problem == "sinusoid":
        episodes = sinusoid_episodes(tasks)
        if impl in ("mlx", "jax") and algorithm != "maml":
            raise ValueError(f"the {impl} baseline exists for maml only")
        if impl == "mlx":
            step, state = mlx_vmap_compile_maml(sinusoid_net(), mse, 0.01, inner_steps)
            return lambda: mx.eval(step(episodes), state)
        if impl == "jax":
            data = (episodes.support_x, episodes.support_y, episodes.query_x, episodes.query_y)
            return peers.sinusoid_maml("jax", sinusoid_net(), data, inner_steps)
        model = sinusoid_net()
    elif problem == "lora":
        episodes = lora_episodes(tasks, lora["rows"], lora["dim"])
        model = lora_net(lora["dim"], lora["rank"], lora["layers"], fused=impl == "fused")
    else:
        raise ValueError(f"unknown problem {problem!r}; expected sinusoid, lora or lm")
    if impl not in ("fused", "naive"):
        raise ValueError(f"unknown implementation {impl!r}; expected fused, naive or mlx")
    learner = make_learner(algorithm, model, inner_steps=inner_steps, batched=impl == "fused")
    return lambda: learner.meta_train_step(episodes, mse)


# ------------------------------------------------------------------ language model
def save_random_llama(
    folder: Any, dim: int, layers: int, intermediate_size: int | None = None, length: int = 32
) -> dict[str, Any]:
    """A random Llama-shaped mlx-lm model in bfloat16 (128-wide heads from d=128 on),
    saved in ``folder`` with ``folder/tasks.jsonl``: 4 tasks of 8 texts of ``length``
    characters. Returns the model's config."""
    import json
    from pathlib import Path

    from metapeft.lm.random_model import save_random_model

    config = save_random_model(
        folder,
        "llama",
        hidden_size=dim,
        num_layers=layers,
        intermediate_size=intermediate_size,
        num_heads=dim // 128 if dim >= 128 else 4,
        num_kv_heads=dim // 256 if dim >= 256 else 2,
        dtype=mx.bfloat16,
    )
    text = ("abcdefgh " * length)[:length]
    lines = [json.dumps({"task": f"t{t}", "text": text}) for t in range(4) for _ in range(8)]
    (Path(folder) / "tasks.jsonl").write_text("\n".join(lines) + "\n")
    return config


def lm_meta_step(
    algorithm: str, impl: str, *, tasks: int, inner_steps: int, dim: int, layers: int
) -> Callable[[], Any]:
    """One LoRA meta-step on a random Llama-shaped mlx-lm model (bfloat16, rank-8
    adapters on ``q_proj`` and ``v_proj``, 2 + 2 examples of 31 tokens per task).

    ``fused`` adapts every task at once on metapeft's layers; ``naive`` loops over
    tasks on mlx-lm's own LoRA layers, as a user of mlx-lm would.
    """
    import tempfile
    from pathlib import Path

    from mlx_lm.tuner.utils import linear_to_lora_layers

    from metapeft import lm

    spec = lm.LoRASpec(rank=8, keys=("self_attn.q_proj", "self_attn.v_proj"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_random_llama(folder, dim, layers)
        model, tokenizer, _ = lm.load_model(folder)
        text_tasks = lm.TextTasks.from_jsonl(folder / "tasks.jsonl", tokenizer, 2, 2)
        mx.eval(model.parameters())
    if impl == "fused":
        lm.add_lora(model, spec)
    elif impl == "naive":
        model.freeze()
        linear_to_lora_layers(model, len(model.layers), spec.lora_parameters())
    else:
        raise ValueError(f"unknown implementation {impl!r}; expected fused or naive")
    fused = impl == "fused"
    learner = lm.build_learner(model, algorithm, 0.1, inner_steps, 1e-3, fused, fast=fused)
    episodes = text_tasks.sample(tasks)
    return lambda: learner.meta_train_step(episodes)
