"""Small random language models saved in mlx-lm's layout, with a tokenizer built
locally: for tests, benchmarks and experiments that must not touch the network.

A saved folder holds ``config.json``, ``model.safetensors`` (with its index) and a
Hugging Face fast tokenizer (``tokenizer.json``, ``tokenizer_config.json``), so that
``mlx_lm.load(folder)`` and ``mlx_lm.lora --model folder`` accept it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx

__all__ = [
    "ARCHITECTURES",
    "CHARACTERS",
    "random_config",
    "save_char_tokenizer",
    "save_random_model",
]

# The characters of the built-in character-level vocabulary (after four special tokens).
CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789 .,:;=-+>?!'\n"
_SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")

# Architecture-specific config fields for the model types mlx-lm names.
_EXTRA: dict[str, dict[str, Any]] = {
    "llama": {"tie_word_embeddings": True},
    "mistral": {"tie_word_embeddings": False},
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {"tie_word_embeddings": True, "max_position_embeddings": 512, "rope_theta": 1e6},
    "phi3": {"tie_word_embeddings": False},
    "gemma": {},
}
ARCHITECTURES = tuple(_EXTRA)


def random_config(
    model_type: str,
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
) -> dict[str, Any]:
    """A Hugging Face style ``config.json`` dict for ``model_type``.

    Args:
        model_type: One of :data:`ARCHITECTURES`.
        vocab_size: Tokens in the vocabulary.
        hidden_size: Model width ``d``.
        num_layers: Transformer blocks.
        num_heads: Attention heads (``hidden_size`` must be divisible by it).
        num_kv_heads: Key/value heads.
        intermediate_size: MLP width; default ``2 * hidden_size``.

    Example:
        >>> random_config("llama", vocab_size=54)["num_hidden_layers"]
        2
    """
    if model_type not in _EXTRA:
        raise ValueError(f"model_type must be one of {list(ARCHITECTURES)}, got {model_type!r}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    return {
        "model_type": model_type,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "intermediate_size": intermediate_size or 2 * hidden_size,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **_EXTRA[model_type],
    }


def save_char_tokenizer(path: str | Path, characters: str = CHARACTERS) -> int:
    """Saves a character-level fast tokenizer (one token per character; ``<pad>``,
    ``<s>``, ``</s>``, ``<unk>`` first) to the folder ``path``; returns its vocabulary size.

    Example:
        >>> save_char_tokenizer("tiny-model")
        53
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(_SPECIAL)}
    for c in characters:
        vocab.setdefault(c, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    fast.save_pretrained(str(path))
    return len(vocab)


def save_random_model(
    path: str | Path,
    model_type: str = "llama",
    *,
    seed: int = 0,
    quantize_bits: int | None = None,
    group_size: int = 32,
    dtype: mx.Dtype = mx.float32,
    **sizes: int,
) -> dict[str, Any]:
    """Builds an mlx-lm model of ``model_type`` with random weights and saves it, with a
    character-level tokenizer, in mlx-lm's layout; returns the config it wrote.

    Args:
        path: The folder to write (created if needed).
        model_type: One of :data:`ARCHITECTURES`.
        seed: Seed of the random weights.
        quantize_bits: Quantize the Linear and Embedding layers to this many bits as
            ``mlx_lm.convert -q`` does (e.g. 4); None keeps full precision.
        group_size: Quantization group size (divides every input width).
        dtype: Dtype of the floating-point weights.
        **sizes: Passed to :func:`random_config` (``hidden_size``, ``num_layers``, ...).

    Example:
        >>> config = save_random_model("tiny-llama", "llama", hidden_size=32)
        >>> import mlx_lm
        >>> model, tokenizer = mlx_lm.load("tiny-llama")
    """
    from mlx.utils import tree_map
    from mlx_lm.utils import _get_classes, quantize_model, save_config, save_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab_size = save_char_tokenizer(path)
    config = random_config(model_type, vocab_size, **sizes)
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    model.update(tree_map(lambda p: p.astype(dtype), model.parameters()))
    if quantize_bits is not None:
        model, config = quantize_model(model, config, group_size, quantize_bits)
    mx.eval(model.parameters())
    save_model(path, model)
    save_config(config, path / "config.json")
    return json.loads((path / "config.json").read_text())
