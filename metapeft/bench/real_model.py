"""Pretrained-model shapes: one LoRA forward and backward pass, and one FOMAML
meta-step, on the architectures of SmolLM2-135M and Llama 3.2 1B (random weights:
the time does not depend on their values), for metapeft, stock mlx-lm and PyTorch
with transformers and peft.

- ``lora_step(shape, impl)``: the loss of a batch of ``batch x length`` tokens and its
  gradient with respect to rank-8 adapters on ``q_proj`` and ``v_proj``; ``impl`` is
  ``fused`` (metapeft: :func:`metapeft.lm.add_lora` on the fast layers, compiled),
  ``mlx-lm`` (mlx-lm's own LoRA layers, compiled) or ``torch`` (transformers + peft,
  eager).
- ``meta_step(shape, impl)``: FOMAML with one inner SGD step over ``tasks`` tasks of
  ``shots`` support and ``shots`` query sequences: ``fused`` (metapeft) adapts every
  task at once; ``torch`` is the loop a PyTorch user writes (learn2learn style): per task,
  clone the adapters, take the inner step, and add the query gradient.

Each returns a function that runs one step to completion.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np

__all__ = ["SHAPES", "Product", "lora_step", "meta_step", "step_gflop", "step_products"]

# Hugging Face config fields of each architecture (Llama family, tied embeddings).
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {  # for tests and quick runs
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 256,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "max_position_embeddings": 512,
    },
    "smollm2-135m": {
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
    },
    "llama3.2-1b": {
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "intermediate_size": 8192,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "max_position_embeddings": 131072,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
        },
    },
}
LORA_KEYS = ("self_attn.q_proj", "self_attn.v_proj")
RANK, ALPHA = 8, 16.0
INNER_LR, OUTER_LR = 0.01, 1e-3


class Product(NamedTuple):
    """``batch`` products of an ``m x k`` matrix times a ``k x n`` one. The second
    operand is the weight ``weight``, stored ``(n, k)`` (or ``(k, n)`` and used
    transposed, when ``transposed``), as :func:`metapeft.ops.linear` takes it; ``None``
    if it is an activation (an adapter's weight gradient, attention's products)."""

    m: int
    k: int
    n: int
    weight: str | None = None
    transposed: bool = False
    batch: int = 1

    @property
    def flop(self) -> int:
        return 2 * self.batch * self.m * self.k * self.n


def step_products(shape: str, sequences: int, length: int) -> list[Product]:
    """The matrix products of one LoRA forward and backward pass over ``sequences``
    sequences of ``length`` tokens, in order: each frozen product forward, the
    adapters' two products forward and attention's two (per sequence and key-value
    head, its query heads stacked); then, backward, each frozen weight's input
    gradient, the adapters' four products and attention's four."""
    c = SHAPES[shape]
    d, hd, hidden = c["hidden_size"], c["head_dim"], c["intermediate_size"]
    heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    q, kv = heads * hd, kv_heads * hd
    tokens = sequences * length
    block = {
        "q_proj": (d, q),
        "k_proj": (d, kv),
        "v_proj": (d, kv),
        "o_proj": (q, d),
        "gate_proj": (d, hidden),
        "up_proj": (d, hidden),
        "down_proj": (hidden, d),
    }
    frozen = [(f"{i}.{k}", io) for i in range(c["num_hidden_layers"]) for k, io in block.items()]
    frozen.append(("head", (d, c["vocab_size"])))
    adapted = [(name, io) for name, io in frozen if name.endswith(("q_proj", "v_proj"))]
    forward, backward = [], []
    for name, (d_in, d_out) in frozen:
        forward.append(Product(tokens, d_in, d_out, name))
        backward.append(Product(tokens, d_out, d_in, name, transposed=True))
    for name, (d_in, d_out) in adapted:  # lora_a (d_in, r), lora_b (r, d_out), as mlx-lm
        a, b = f"{name}.lora_a", f"{name}.lora_b"
        forward += [Product(tokens, d_in, RANK, a, True), Product(tokens, RANK, d_out, b, True)]
        backward += [Product(RANK, tokens, d_out), Product(tokens, d_out, RANK, b)]  # dB, d(xA)
        backward += [Product(d_in, tokens, RANK), Product(tokens, RANK, d_in, a)]  # dA, dx
    rows, n = (heads // kv_heads) * length, sequences * kv_heads  # stacked queries, batch
    for _ in range(c["num_hidden_layers"]):
        forward += [Product(rows, hd, length, batch=n), Product(rows, length, hd, batch=n)]
        backward += [
            Product(rows, hd, length, batch=n),  # d(probs) = d(out) values^T
            Product(length, rows, hd, batch=n),  # d(values) = probs^T d(out)
            Product(rows, length, hd, batch=n),  # d(queries) = d(scores) keys
            Product(length, rows, hd, batch=n),  # d(keys) = d(scores)^T queries
        ]
    return forward + backward


def step_gflop(shape: str, sequences: int, length: int) -> float:
    """GFLOP of :func:`step_products`: the roofline's numerator."""
    return sum(p.flop for p in step_products(shape, sequences, length)) / 1e9


def _tokens(rows: int, length: int, vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(rows, length + 1))


def mlx_model(shape: str, seed: int = 0, dtype: mx.Dtype = mx.float32) -> Any:
    """An mlx-lm Llama of ``shape`` with random weights, evaluated."""
    from mlx.utils import tree_map
    from mlx_lm.models import llama

    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict({"model_type": "llama", **SHAPES[shape]}))
    model.update(tree_map(lambda p: p.astype(dtype), model.parameters()))
    mx.eval(model.parameters())
    return model


def torch_model(shape: str, seed: int = 0) -> Any:
    """The transformers Llama of ``shape`` with peft's rank-8 adapters, random weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
    targets = [k.split(".")[-1] for k in LORA_KEYS]
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, lora_dropout=0.0)
    return get_peft_model(model, config)


def lora_step(
    shape: str, impl: str, *, batch: int = 4, length: int = 64, seed: int = 0
) -> Callable[[], Any]:
    """One LoRA forward and backward pass (float32), ready to time."""
    data = _tokens(batch, length, SHAPES[shape]["vocab_size"], seed)
    if impl == "torch":
        import torch

        model = torch_model(shape, seed)
        x, y = torch.from_numpy(data[:, :-1]), torch.from_numpy(data[:, 1:])

        def step():
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
            loss.backward()
            return loss

        return step
    import mlx.nn as nn

    from metapeft import lm

    model = mlx_model(shape, seed)
    x, y = mx.array(data[:, :-1]), mx.array(data[:, 1:])
    if impl == "fused":
        lm.add_lora(model, lm.LoRASpec(rank=RANK, alpha=ALPHA, keys=LORA_KEYS))
        loss_fn = lm.lm_loss
    elif impl == "mlx-lm":
        from mlx_lm.tuner.utils import linear_to_lora_layers

        model.freeze()
        params = {"rank": RANK, "scale": ALPHA / RANK, "dropout": 0.0, "keys": list(LORA_KEYS)}
        linear_to_lora_layers(model, len(model.layers), params)

        def loss_fn(model, x, y):
            return nn.losses.cross_entropy(model(x).astype(mx.float32), y).mean()
    else:
        raise ValueError(f"unknown implementation {impl!r}; expected fused, mlx-lm or torch")
    params = model.trainable_parameters()
    mx.eval(model.parameters())

    def loss(params, x, y):
        model.update(params)
        return loss_fn(model, x, y)

    compiled = mx.compile(mx.value_and_grad(loss))

    def step():
        out = compiled(params, x, y)
        model.update(params)
        mx.eval(out)
        return out

    return step


def meta_step(
    shape: str,
    impl: str,
    *,
    tasks: int = 4,
    shots: int = 4,
    length: int = 16,
    seed: int = 0,
) -> Callable[[], Any]:
    """One FOMAML meta-step with one inner SGD step (float32), ready to time."""
    vocab = SHAPES[shape]["vocab_size"]
    data = _tokens(tasks * 2 * shots, length, vocab, seed).reshape(tasks, 2, shots, length + 1)
    if impl == "torch":
        return _torch_fomaml(shape, data, seed)
    if impl != "fused":
        raise ValueError(f"unknown implementation {impl!r}; expected fused or torch")
    import mlx.optimizers as optim

    from metapeft import lm
    from metapeft.learners import FOMAML
    from metapeft.tasks import Episodes

    model = mlx_model(shape, seed)
    lm.add_lora(model, lm.LoRASpec(rank=RANK, alpha=ALPHA, keys=LORA_KEYS))
    adam = optim.Adam(OUTER_LR, bias_correction=True)
    learner = FOMAML(model, adam, inner_lr=INNER_LR, inner_steps=1, loss_fn=lm.lm_loss)
    arrays = [mx.array(data[:, s, :, sl]) for s in (0, 1) for sl in (slice(0, -1), slice(1, None))]
    episodes = Episodes(*arrays)
    return lambda: learner.meta_train_step(episodes)


def _torch_fomaml(shape: str, data: np.ndarray, seed: int) -> Callable[[], Any]:
    """FOMAML as a PyTorch user writes it: a loop over tasks, each cloning the
    adapters, taking the inner step with ``torch.autograd.grad`` and adding its query
    gradient to the adapters' ``.grad``; then Adam. The step returns the mean query
    loss."""
    import torch
    from torch.func import functional_call

    model = torch_model(shape, seed)
    adapters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    adam = torch.optim.Adam(adapters.values(), lr=OUTER_LR)
    tasks = data.shape[0]
    batches = torch.from_numpy(data)

    def loss(params, tokens):
        logits = functional_call(model, params, (tokens[:, :-1],), strict=False).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    def step():
        adam.zero_grad(set_to_none=True)
        total = 0.0
        for t in range(tasks):
            fast = {n: p.detach().clone().requires_grad_() for n, p in adapters.items()}
            grads = torch.autograd.grad(loss(fast, batches[t, 0]), list(fast.values()))
            adapted = {
                n: (p - INNER_LR * g).detach().requires_grad_()
                for (n, p), g in zip(fast.items(), grads, strict=True)
            }
            query = loss(adapted, batches[t, 1])
            total += query.item()
            for p, g in zip(
                adapters.values(), torch.autograd.grad(query, list(adapted.values())), strict=True
            ):
                p.grad = g / tasks if p.grad is None else p.grad + g / tasks
        adam.step()
        return total / tasks

    return step
