"""GGUF models (llama.cpp's format, as Ollama and LM Studio keep them) as mlx-lm models.

MLX reads GGUF itself (``mx.load(path, return_metadata=True)``): float tensors come
back as arrays, and Q4_0, Q4_1 and Q8_0 tensors as MLX-quantized triples (weight,
scales, biases; groups of 32). :func:`convert_gguf` renames them to mlx-lm's
layout, builds ``config.json`` from the metadata, rebuilds the tokenizer from the
metadata MLX read (with transformers' GGUF tokenizer converters: its own GGUF reader
needs PyTorch) and writes an mlx-lm model folder, so that ``mlx_lm.load``,
``mlx_lm.generate`` and ``mlx_lm.lora`` take it.

llama.cpp's converter permutes the rows of the query and key projections of Llama
models for its rotary embedding; the converted Llama config therefore asks mlx-lm
for the traditional (interleaved) RoPE, which computes the same function on them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx

from metapeft.files import atomic_write_text

__all__ = ["DTYPES", "convert_gguf", "converted_folder", "gguf_config", "models_dir"]

# What ``convert_gguf`` can write: float dtypes (dequantizing), or the file's own
# quantization kept as MLX-quantized layers.
DTYPES = ("float32", "float16", "bfloat16", "quantized")
ARCHITECTURES = ("llama", "qwen2")
GROUP_SIZE = 32  # MLX's group size for the GGUF quantizations it reads
# The GGUF tensor types MLX reads.
TENSOR_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")

# GGUF tensor names -> mlx-lm module paths (the suffixes .weight, .bias, .scales and
# .biases are kept).
_TOP = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}


def _scalar(meta: dict[str, Any], key: str, source: Path, default: Any = None) -> Any:
    if key not in meta:
        if default is None:
            raise ValueError(f"{source}: GGUF metadata has no {key!r}")
        return default
    value = meta[key]
    return value.item() if isinstance(value, mx.array) else value


def gguf_config(meta: dict[str, Any], tensor_names: set[str], source: Path) -> dict[str, Any]:
    """The Hugging Face style ``config.json`` of a GGUF file's metadata."""
    arch = _scalar(meta, "general.architecture", source)
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{source}: architecture {arch!r} is not supported (supported: "
            f"{', '.join(ARCHITECTURES)}; Mistral and SmolLM files are 'llama')"
        )

    def get(key: str, default: Any = None) -> Any:
        return _scalar(meta, f"{arch}.{key}", source, default)

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    vocab = get("vocab_size", len(meta.get("tokenizer.ggml.tokens", [])) or None)
    if vocab is None:
        raise ValueError(f"{source}: GGUF metadata gives no vocabulary size")
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        # llama.cpp permutes q and k of Llama models for its (interleaved) RoPE.
        "rope_traditional": arch == "llama",
    }
    for name, key in (("bos_token_id", "bos"), ("eos_token_id", "eos")):
        token = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token is not None:
            config[name] = int(token.item() if isinstance(token, mx.array) else token)
    return config


def _mlx_name(name: str, source: Path) -> str:
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(\w+)", name)
    if match:
        layer, part, suffix = match.groups()
        if part in _BLOCK:
            return f"model.layers.{layer}.{_BLOCK[part]}.{suffix}"
    else:
        base, _, suffix = name.rpartition(".")
        if base in _TOP:
            return f"{_TOP[base]}.{suffix}"
    raise ValueError(f"{source}: tensor {name!r} has no place in an mlx-lm Llama or Qwen2 model")


def _quantized_bits(weights: dict[str, mx.array], name: str) -> int:
    """Bits per weight of the MLX-quantized triple ``name`` (weight, scales, biases)."""
    packed = weights[f"{name}.weight"].shape[-1] * 32
    return packed // (weights[f"{name}.scales"].shape[-1] * GROUP_SIZE)


def read_gguf(path: str | Path, dtype: str = "float32") -> tuple[dict, dict, dict]:
    """``(weights, config, metadata)`` of a GGUF file, weights renamed for mlx-lm and
    converted to ``dtype`` (one of :data:`DTYPES`)."""
    path = Path(path)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        raw, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:  # MLX raises RuntimeError/ValueError for bad files
        unsupported = _unsupported_tensor_types(path)
        if unsupported:
            raise ValueError(
                f"{path}: tensor types {', '.join(unsupported)} are not supported (MLX "
                f"reads {', '.join(TENSOR_TYPES)}; re-quantize the model to one of them)"
            ) from None
        raise ValueError(f"{path}: not a GGUF file MLX can read ({e})") from None
    config = gguf_config(meta, set(raw), path)
    weights = {_mlx_name(k, path): v for k, v in raw.items()}
    quantized = sorted(k[: -len(".scales")] for k in weights if k.endswith(".scales"))
    bits = {_quantized_bits(weights, name) for name in quantized}
    if dtype == "quantized":
        if bits:
            # The commonest width; mlx-lm reads each other layer's own from its arrays
            # (GGUF files mix them: SmolLM2's Q4_1 keeps some tensors in Q8_0).
            widths = [_quantized_bits(weights, name) for name in quantized]
            config["quantization"] = {
                "group_size": GROUP_SIZE,
                "bits": max(set(widths), key=widths.count),
            }
        return weights, config, meta
    target = getattr(mx, dtype)
    for name in quantized:
        w, s = weights.pop(f"{name}.weight"), weights.pop(f"{name}.scales")
        b = weights.pop(f"{name}.biases", None)
        nbits = _quantized_bits({f"{name}.weight": w, f"{name}.scales": s}, name)
        weights[f"{name}.weight"] = mx.dequantize(w, s, b, group_size=GROUP_SIZE, bits=nbits)
    weights = {
        k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v
        for k, v in weights.items()
    }
    return weights, config, meta


def _unsupported_tensor_types(path: Path) -> list[str]:
    """The tensor types of a readable GGUF header that MLX does not read ([] when the
    header cannot be read)."""
    try:
        from gguf import GGUFReader

        types = {t.tensor_type.name for t in GGUFReader(str(path)).tensors}
    except Exception:  # a truncated or foreign file: the caller reports it as such
        return []
    return sorted(types - set(TENSOR_TYPES))


def models_dir() -> Path:
    """Where metapeft keeps models: ``$METAPEFT_MODELS``, by default ``~/.cache/metapeft``."""
    default = Path.home() / ".cache" / "metapeft"
    return Path(os.environ.get("METAPEFT_MODELS", default)).expanduser()


def converted_folder(path: str | Path) -> Path:
    """The mlx-lm folder of the GGUF file ``path`` in float32, converted once and kept
    in ``models_dir()/converted/`` under the file's name, size and modification time
    (a changed file converts again).

    Example:
        >>> converted_folder("SmolLM2-135M-Instruct.Q4_1.gguf").name  # doctest: +SKIP
        'SmolLM2-135M-Instruct.Q4_1-103679520-1733480000000000000'
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    stat = path.stat()
    folder = models_dir() / "converted" / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if not (folder / "config.json").is_file():
        try:
            convert_gguf(path, folder)
        except OSError:
            if not (folder / "config.json").is_file():  # not another process's conversion
                raise
    return folder


# llama.cpp's special-token keys, as transformers names the tokens.
_SPECIAL_TOKENS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def _plain(value: Any) -> Any:
    """A metadata value as Python: MLX arrays become numbers or lists."""
    return value.tolist() if isinstance(value, mx.array) else value


def gguf_tokenizer(meta: dict[str, Any], source: Path) -> Any:
    """A transformers fast tokenizer rebuilt from a GGUF file's metadata."""
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    except ImportError as e:
        raise ValueError(f"{source}: rebuilding the tokenizer needs transformers: {e}") from None
    grouped = {
        group: {
            name: _plain(meta[f"tokenizer.{key}"])
            for key, name in renames.items()
            if f"tokenizer.{key}" in meta
        }
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokens, config = grouped["tokenizer"], grouped["tokenizer_config"]
    if "tokens" not in tokens:
        raise ValueError(f"{source}: GGUF metadata has no tokenizer (tokenizer.ggml.tokens)")
    if tokens.get("tokenizer_type") == "llama":
        # llama.cpp adds BOS for a sentencepiece vocabulary that does not say otherwise.
        config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None:
            config[name] = tokens["tokens"][int(_plain(token_id))]
    try:
        backend, extra = convert_gguf_tokenizer(
            _scalar(meta, "general.architecture", source), tokens
        )
    except (KeyError, ValueError) as e:
        raise ValueError(f"{source}: transformers cannot rebuild this tokenizer ({e!r})") from None
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)


def convert_gguf(path: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Writes the GGUF model at ``path`` as an mlx-lm model folder ``out_dir``.

    Args:
        path: A ``.gguf`` file of a Llama-family (Llama, Mistral, SmolLM) or Qwen2
            model with float, Q4_0, Q4_1 or Q8_0 tensors.
        out_dir: The folder to write; it must not exist yet, or be empty.
        dtype: ``float32``, ``float16`` or ``bfloat16`` (dequantizing), or
            ``quantized`` (the file's quantization, as MLX-quantized layers).

    Returns:
        ``out_dir``, holding ``config.json``, ``model.safetensors`` and the tokenizer.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not GGUF, its architecture or a tensor is not
            supported, or ``out_dir`` holds files.

    Example:
        >>> convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m")
    """
    path, out_dir = Path(path), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir}: the folder exists and is not empty")
    weights, config, meta = read_gguf(path, dtype)
    tokenizer = gguf_tokenizer(meta, path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed at the end: a failure leaves no half folder.
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        tokenizer.save_pretrained(str(staging))
        mx.save_safetensors(str(staging / "model.safetensors"), weights, {"format": "mlx"})
        atomic_write_text(staging / "config.json", json.dumps(config, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
