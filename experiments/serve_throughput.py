"""``metapeft serve`` under load, over HTTP: tokens per second and time to first token
for 8 concurrent streams on 8 different adapters, 8 on one adapter, and the same 8
requests served one after the other (adapter by adapter, as a server that holds one
adapter at a time must).

The server runs SmolLM2-135M-Instruct (the converted folder of
``experiments/fetch_smollm2.py``) with 8 random rank-8 adapters on ``q_proj`` and
``v_proj``; each request is a greedy streaming chat completion of at most ``--tokens`` tokens. Each
mode runs ``--rounds`` times after a warm-up; throughput is the generated tokens over
the wall time of a round (median over rounds), and the time to first token is taken
from every request of every round (p50 and p99).

Usage:
    python experiments/serve_throughput.py --out results/<machine>/serve_throughput
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

from metapeft import machine
from metapeft.lm.gguf import models_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serve_helpers import ServerProcess  # noqa: E402

STREAMS = 8
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle gear works.",
    "Describe the water cycle to a child.",
    "List some uses of copper in everyday life.",
    "Tell me about the history of paper.",
    "How do bees make honey?",
    "What makes a good cup of tea?",
    "Describe a walk through a forest in autumn.",
]


def save_adapters(model_dir: Path, root: Path) -> list[Path]:
    """Eight random (non-zero) rank-8 adapters on q/v, in mlx-lm's layout."""
    import mlx_lm

    from metapeft.lm import LoRASpec, add_lora
    from metapeft.lm import save_adapters as save

    spec = LoRASpec(rank=8, alpha=16.0, keys=("self_attn.q_proj", "self_attn.v_proj"))
    model, _ = mlx_lm.load(str(model_dir))
    add_lora(model, spec, fast=False)
    folders = []
    for i in range(STREAMS):
        mx.random.seed(i)
        weights = tree_map(lambda p: 0.02 * mx.random.normal(p.shape), model.trainable_parameters())
        folders.append(save(root / f"a{i}", weights, spec, {"model": str(model_dir)}))
    return folders


async def stream(client: httpx.AsyncClient, url: str, model: str, prompt: str, tokens: int):
    """One streaming chat completion: (seconds to the first token, completion tokens)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first, generated = None, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                generated = chunk["usage"]["completion_tokens"]
    return first, generated


async def round_of(url: str, mode: str, tokens: int) -> tuple[float, list[float], int]:
    """One round: (wall seconds, times to first token, tokens generated)."""
    models = ["a0"] * STREAMS if mode == "one adapter" else [f"a{i}" for i in range(STREAMS)]
    pairs = list(zip(models, PROMPTS, strict=True))
    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        if mode == "adapter by adapter":
            results = [await stream(client, url, m, p, tokens) for m, p in pairs]
        else:
            results = await asyncio.gather(*(stream(client, url, m, p, tokens) for m, p in pairs))
        wall = time.perf_counter() - start
    return wall, [r[0] for r in results], sum(r[1] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=models_dir() / "smollm2-135m")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-model-len", type=int, help="for models whose config gives none")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model}: no model folder (experiments/fetch_smollm2.py --convert)")
    modes = ("mixed adapters", "one adapter", "adapter by adapter")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = save_adapters(args.model, Path(tmp))
        options = ["--model", str(args.model), "--max-batch-size", str(STREAMS)]
        options += ["--lora-modules", *(f"a{i}={f}" for i, f in enumerate(folders))]
        if args.max_model_len:
            options += ["--max-model-len", str(args.max_model_len)]
        with ServerProcess(options, Path(tmp) / "server.log", startup_timeout=300) as server:
            asyncio.run(round_of(server.url, "mixed adapters", 4))  # warm-up
            for mode in modes:
                walls, ttfts, generated = [], [], []
                for _ in range(args.rounds):
                    wall, firsts, tokens = asyncio.run(round_of(server.url, mode, args.tokens))
                    walls.append(wall)
                    ttfts += firsts
                    generated.append(tokens)
                rows.append(
                    {
                        "mode": mode,
                        "tokens_per_s": float(np.median(np.array(generated) / np.array(walls))),
                        "ttft_p50_s": float(np.percentile(ttfts, 50)),
                        "ttft_p99_s": float(np.percentile(ttfts, 99)),
                        "rounds": args.rounds,
                        "tokens": generated,
                        "walls": walls,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    by = {r["mode"]: r for r in rows}
    mixed = by["mixed adapters"]["tokens_per_s"]
    table = [
        f"metapeft serve, {args.model.name} (fp32), {STREAMS} streaming greedy chat "
        f"completions of at most {args.tokens} tokens, {args.rounds} rounds per mode; "
        "throughput is the median round's; time to first token over all "
        f"{STREAMS * args.rounds} requests",
        "",
        "| mode | tokens/s | mixed / this | TTFT p50 | TTFT p99 |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        table.append(
            f"| {r['mode']} | {r['tokens_per_s']:.1f} | {mixed / r['tokens_per_s']:.2f} | "
            f"{r['ttft_p50_s'] * 1e3:.0f} ms | {r['ttft_p99_s'] * 1e3:.0f} ms |"
        )
    print("\n".join(table))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"machine": machine.info(), "args": {k: str(v) for k, v in vars(args).items()}}
        record["rows"] = rows
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=2))
        args.out.with_suffix(".md").write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
