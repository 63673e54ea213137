"""``metapeft serve``: the options, then uvicorn.

``python -m metapeft.serve --model PATH [...]`` runs :func:`main`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["main", "parser"]

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def parser() -> argparse.ArgumentParser:
    """The command line of ``metapeft serve``."""
    p = argparse.ArgumentParser(
        prog="metapeft serve",
        description="Serve an mlx-lm model and its LoRA adapters with an OpenAI-compatible "
        "API; concurrent requests decode in one batch whatever their adapters.",
    )
    p.add_argument("--model", required=True, help="An mlx-lm model folder or a .gguf file.")
    p.add_argument(
        "--served-model-name", help="The base model's name in requests (default: --model)."
    )
    p.add_argument(
        "--lora-modules",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME=ADAPTER_DIR",
        help="mlx-lm adapter folders to serve, each under a name requests give as 'model'.",
    )
    p.add_argument("--host", default="127.0.0.1", help="Address to bind (default: loopback).")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=8, help="Requests decoded together.")
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="Requests waiting for a place in the batch; beyond, 503 with Retry-After.",
    )
    p.add_argument("--max-loras", type=int, default=8, help="Adapters loaded at once.")
    p.add_argument("--max-lora-rank", type=int, default=16, help="Largest adapter rank accepted.")
    p.add_argument(
        "--max-model-len",
        type=int,
        help="Context length, prompt and generated tokens (default: the model config's "
        "max_position_embeddings).",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("METAPEFT_API_KEY"),
        help="Require 'Authorization: Bearer KEY' on every /v1 request "
        "(default: $METAPEFT_API_KEY).",
    )
    p.add_argument(
        "--allow-runtime-lora",
        action="store_true",
        help="Enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter.",
    )
    p.add_argument("--lora-root", help="Runtime adapter loads only from folders under this one.")
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv`` (default: ``sys.argv[1:]``), loads the model and adapters, and
    serves until interrupted; returns the exit status (2 for bad options or files).

    Example:
        >>> main(["--model", "tiny-llama", "--lora-modules", "a=adapters/a", "--port", "8001"])
    """
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    modules = {}
    for item in args.lora_modules:
        name, sep, path = item.partition("=")
        if not (sep and name and path):
            print(f"error: --lora-modules expects NAME=ADAPTER_DIR, got {item!r}", file=sys.stderr)
            return 2
        if name in modules:
            print(f"error: --lora-modules names {name!r} twice", file=sys.stderr)
            return 2
        modules[name] = path
    try:
        import uvicorn

        from metapeft.serve.app import Server, ServerOptions, create_app
    except ImportError as e:
        hint = "install the server with: pip install 'metapeft[serve]'"
        print(f"error: {e}; {hint}", file=sys.stderr)
        return 2
    options = ServerOptions(
        model=args.model,
        served_model_name=args.served_model_name,
        lora_modules=modules,
        max_batch_size=args.max_batch_size,
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        max_queue=args.max_queue,
        max_model_len=args.max_model_len,
        api_key=args.api_key,
        allow_runtime_lora=args.allow_runtime_lora,
        lora_root=args.lora_root,
    )
    try:
        server = Server.load(options)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.host not in _LOOPBACK and args.api_key is None:
        logging.warning("serving on %s without --api-key: anyone reaching it may use it", args.host)
    uvicorn.run(
        create_app(server),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=10,
    )
    return 0
