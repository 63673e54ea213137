"""Where the time of a LoRA step on a pretrained model's shape goes, by kind of operation.

The full step (metapeft's fast path, compiled) is timed, then each of its pieces alone
at the step's shapes (compiled forward and backward, medians), times the number of
times the step runs it:

- BLAS products: each frozen projection of a block and the tied output layer, forward
  and its input gradient;
- LoRA: the adapters' extra cost on ``q_proj`` and ``v_proj`` (the LoRA layer's
  forward and backward less the frozen product's);
- attention: ``ops.attention`` (scores, causal softmax, values), forward and backward;
- RoPE, RMSNorm, elementwise (SwiGLU and the residual adds), loss (cross-entropy over
  the vocabulary), embedding lookup;
- the rest: the step less the sum of its pieces (graph scheduling, copies, memory).

It does so for the LoRA forward+backward (``batch x length`` tokens) and for the
meta-step's passes (FOMAML, ``tasks x shots`` sequences, one support and one query
pass), and states the step's GFLOP against the BLAS rate of a 2048^3 product.

Usage:
    python experiments/lm_step_profile.py --shape smollm2-135m --out results/<machine>/profile
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from common import write_results

from metapeft import lm, ops
from metapeft.bench import real_model
from metapeft.bench.runner import prepare_process


def median_time(fn: Callable, *args, repeat: int = 9) -> float:
    """Median seconds of ``mx.compile(fn)(*args)``, after one call that compiles it."""
    compiled = mx.compile(fn)
    mx.eval(compiled(*args))
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        mx.eval(compiled(*args))
        times.append(time.perf_counter() - start)
    return sorted(times)[repeat // 2]


def fwd_bwd(fn: Callable, *args, argnums=0) -> float:
    """Forward and backward of ``sum(fn(*args) * c)``, c a fixed random cotangent."""
    cot = mx.random.normal(fn(*args).shape)
    mx.eval(cot)
    return median_time(mx.value_and_grad(lambda *a: (fn(*a) * cot).sum(), argnums=argnums), *args)


def pieces(model: nn.Module, shape: str, rows: int, length: int) -> dict[str, float]:
    """Seconds of each kind of operation in one forward and backward pass over
    ``rows`` sequences of ``length`` tokens."""
    c = real_model.SHAPES[shape]
    layers, d, hd = c["num_hidden_layers"], c["hidden_size"], c["head_dim"]
    heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    block = model.layers[0]
    attn, mlp = block.self_attn, block.mlp
    x = mx.random.normal((rows, length, d))
    hidden = mx.random.normal((rows, length, c["intermediate_size"]))
    q = mx.random.normal((rows, heads, length, hd))
    k = mx.random.normal((rows, kv_heads, length, hd))
    v = mx.random.normal((rows, kv_heads, length, hd))
    mx.eval(x, hidden, q, k, v)
    out: dict[str, float] = {}

    def frozen(module, inp):
        return fwd_bwd(lambda a: ops.linear(a, module["weight"]), inp)

    products = [attn.k_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj]
    per_block = sum(frozen(m, x) for m in products) + frozen(mlp.down_proj, hidden)
    lora_extra = 0.0
    for layer in (attn.q_proj, attn.v_proj):
        base = frozen(layer, x)
        per_block += base
        params = {"lora_a": layer["lora_a"], "lora_b": layer["lora_b"]}

        def with_lora(p, a, layer=layer):
            layer.update(p)
            return layer(a)

        lora_extra += fwd_bwd(with_lora, params, x, argnums=(0, 1)) - base
        layer.update(params)
    embed = model.model.embed_tokens
    out["BLAS products"] = layers * per_block + fwd_bwd(embed.as_linear, x)
    out["LoRA adapters"] = layers * lora_extra
    out["attention"] = layers * fwd_bwd(
        lambda q, k, v: ops.attention(q, k, v, hd**-0.5, "causal"), q, k, v, argnums=(0, 1, 2)
    )
    out["RoPE"] = layers * (fwd_bwd(attn.rope, q) + fwd_bwd(attn.rope, k))
    out["RMSNorm"] = (2 * layers + 1) * fwd_bwd(block.input_layernorm, x)
    swiglu = fwd_bwd(lambda g, u: g * ops.sigmoid(g) * u, hidden, hidden, argnums=(0, 1))
    residual = fwd_bwd(lambda a, b: a + b, x, x, argnums=(0, 1))
    out["elementwise"] = layers * (swiglu + 2 * residual)
    logits = mx.random.normal((rows, length, c["vocab_size"]))
    targets = mx.random.randint(0, c["vocab_size"], (rows, length))
    out["loss"] = fwd_bwd(lambda z: ops.cross_entropy(z, targets), logits)
    del logits
    tokens = mx.random.randint(0, c["vocab_size"], (rows, length))
    out["embedding lookup"] = median_time(lambda t: embed(t), tokens)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(real_model.SHAPES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--meta-length", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    conditions = prepare_process()
    a, b = mx.random.normal((2048, 2048)), mx.random.normal((2048, 2048))
    rate = 2 * 2048**3 / median_time(ops.linear, a, b) / 1e9

    model = real_model.mlx_model(args.shape)
    lm.add_lora(model, lm.LoRASpec(rank=real_model.RANK, keys=real_model.LORA_KEYS))
    steps = {
        "LoRA fwd+bwd": (
            real_model.lora_step(args.shape, "fused", batch=args.batch, length=args.length),
            args.batch,
            args.length,
            1,
        ),
        "FOMAML meta-step": (
            real_model.meta_step(
                args.shape, "fused", tasks=args.tasks, shots=args.shots, length=args.meta_length
            ),
            args.tasks * args.shots,
            args.meta_length,
            2,
        ),
    }
    rows, table = (
        [],
        [
            f"Shape {args.shape}, float32, LoRA rank {real_model.RANK} on q_proj and v_proj; "
            f"BLAS {rate:.0f} GFLOP/s (2048^3). Conditions: {conditions}",
            "",
        ],
    )
    for name, (step, seqs, length, passes) in steps.items():
        print(f"{name}: timing", flush=True)
        mx.eval(step())
        times = []
        for _ in range(7):
            start = time.perf_counter()
            mx.eval(step())
            times.append(time.perf_counter() - start)
        total = sorted(times)[3]
        del step
        parts = {k: passes * v for k, v in pieces(model, args.shape, seqs, length).items()}
        parts["the rest (graph, copies, updates)"] = total - sum(parts.values())
        gflop = passes * real_model.step_gflop(args.shape, seqs, length)
        rows.append({"step": name, "seconds": total, "gflop": gflop, "pieces": parts})
        table += [
            f"**{name}** ({passes} x {seqs} x {length} tokens): {total:.3f} s; "
            f"{gflop:.1f} GFLOP of products, {gflop / rate:.3f} s at {rate:.0f} GFLOP/s "
            f"({total / (gflop / rate):.2f}x that roofline)",
            "",
            "| kind | seconds | share |",
            "|---|---:|---:|",
            *(f"| {k} | {v:.3f} | {v / total:.0%} |" for k, v in parts.items()),
            "",
        ]
    args.blas_gflops = rate
    write_results(args.out, args, rows, table)


if __name__ == "__main__":
    main()
