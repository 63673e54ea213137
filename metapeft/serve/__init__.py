"""Serving many LoRA adapters from one model, in one batch (``metapeft serve``).

- :mod:`~metapeft.serve.bank`: the adapter slots, and the layers that run one
  adapter per batch row on :func:`metapeft.ops.lora_linear`.
- :mod:`~metapeft.serve.engine`: continuous batching on one thread.
- :mod:`~metapeft.serve.app`: the OpenAI-compatible HTTP API (FastAPI).
- :mod:`~metapeft.serve.metrics`: the Prometheus metrics.
- :mod:`~metapeft.serve.cli`: the command line; ``python -m metapeft.serve``.

Needs the ``serve`` extra (``pip install "metapeft[serve]"``) and the ``lm`` one.
"""

from metapeft.serve.cli import main

__all__ = ["main"]
