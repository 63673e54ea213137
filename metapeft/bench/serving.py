"""Decoding throughput of ``metapeft serve``'s engine (no HTTP): ``streams`` greedy
generations of ``tokens`` tokens each on a model of :data:`real_model.SHAPES` (random
weights) with ``streams`` random rank-8 adapters on ``q_proj`` and ``v_proj``.

``impl`` is
- ``fused``: the streams decode in one batch, each with its own adapter (per-row
  adapters on :func:`metapeft.ops.lora_linear`);
- ``one adapter``: the streams decode in one batch, all with the same adapter;
- ``adapter by adapter``: one stream after the other, each with its own adapter, as a
  server that holds one adapter at a time would serve them.

Tokens per second are ``streams * tokens`` over the time of one call.
"""

from __future__ import annotations

import asyncio
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np

from metapeft.bench.real_model import ALPHA, LORA_KEYS, RANK, SHAPES, mlx_model

__all__ = ["IMPLS", "decode"]

IMPLS = ("fused", "one adapter", "adapter by adapter")


def decode(
    shape: str, impl: str, *, streams: int = 8, tokens: int = 32, prompt: int = 16, seed: int = 0
) -> Callable[[], int]:
    """A function that serves the streams once and returns the tokens generated.

    Example:
        >>> step = decode("tiny", "fused", streams=2, tokens=4)
        >>> step()
        8
    """
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from metapeft.lm import LoRASpec, adapter_paths, save_adapters
    from metapeft.lm.random_model import save_char_tokenizer
    from metapeft.nn import use_fast_layers
    from metapeft.serve.bank import AdapterBank
    from metapeft.serve.engine import Engine, Generation
    from metapeft.serve.metrics import ServerMetrics
    from metapeft.serve.sampling import Sampling

    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLS}")
    model = use_fast_layers(mlx_model(shape, seed))
    spec = LoRASpec(RANK, ALPHA, keys=LORA_KEYS)
    rng = np.random.default_rng(seed)
    shapes = {
        path: (module.weight.shape[1], module.weight.shape[0])
        for path, module in adapter_paths(model, spec).items()
    }
    bank = AdapterBank(model, max_loras=streams, max_rank=RANK)
    with tempfile.TemporaryDirectory() as tmp:
        save_char_tokenizer(tmp)
        tokenizer = load_tokenizer(Path(tmp))
        for i in range(streams):
            weights = {}
            for path, (d_in, d_out) in shapes.items():
                weights[f"{path}.lora_a"] = mx.array(rng.normal(0, 0.02, (d_in, RANK)), mx.float32)
                weights[f"{path}.lora_b"] = mx.array(rng.normal(0, 0.02, (RANK, d_out)), mx.float32)
            bank.load(f"a{i}", save_adapters(Path(tmp) / f"a{i}", weights, spec))
    tokenizer.eos_token_ids = set()  # every stream generates all its tokens
    engine = Engine(model, tokenizer, bank, ServerMetrics(), streams, streams)
    engine.start()
    vocab = SHAPES[shape]["vocab_size"]
    prompts = rng.integers(4, vocab, size=(streams, prompt)).tolist()
    names = ["a0"] * streams if impl == "one adapter" else [f"a{i}" for i in range(streams)]

    async def finish(gen: Generation) -> int:
        async for _ in gen.events():
            pass
        return gen.generated

    async def serve() -> int:
        gens = [
            Generation(p, tokens, Sampling(0.0, 1.0, 0), adapter=bank.acquire(name))
            for p, name in zip(prompts, names, strict=True)
        ]
        if impl == "adapter by adapter":
            done = 0
            for gen in gens:
                engine.submit(gen)
                done += await finish(gen)
            return done
        for gen in gens:
            engine.submit(gen)
        return sum(await asyncio.gather(*(finish(g) for g in gens)))

    def step() -> int:
        return asyncio.run(serve())

    weakref.finalize(step, engine.stop)
    return step
