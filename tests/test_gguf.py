"""metapeft.lm.gguf and ``metapeft convert-gguf``: a GGUF file written as llama.cpp
writes it (q and k permuted, float and Q8_0 tensors, a byte-level BPE tokenizer)
becomes an mlx-lm model folder that computes the original model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

pytest.importorskip("mlx_lm")
gguf = pytest.importorskip("gguf")

from typer.testing import CliRunner  # noqa: E402

from metapeft.cli import app  # noqa: E402
from metapeft.lm import load_model  # noqa: E402
from metapeft.lm.gguf import convert_gguf, models_dir  # noqa: E402
from metapeft.lm.random_model import random_config  # noqa: E402

SIZES = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96)
BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "input_layernorm": "attn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "post_attention_layernorm": "ffn_norm",
}


def byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: a byte-level BPE vocabulary with no merges."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's reordering of a q or k projection's rows for its RoPE."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


TOKENS = ["<pad>", "<s>", "</s>", *byte_tokens()]
CONFIG = {**random_config("llama", len(TOKENS), **SIZES), "rope_traditional": False}


def reference_model():
    """The tiny Llama the files are written from (mlx-lm's, non-interleaved RoPE)."""
    from mlx_lm.models import llama

    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(CONFIG))
    mx.eval(model.parameters())
    return model


def write_gguf(
    model, path: Path, quantize=None, arch: str = "llama", tokenizer: bool = True
) -> None:
    """``model`` as llama.cpp's converter would write it; ``quantize``, a GGML type for the
    2-D tensors (Q8_0); ``arch`` and ``tokenizer=False`` make files metapeft refuses."""
    config, tokens, vocab = CONFIG, TOKENS, len(TOKENS)
    weights = dict(tree_flatten(model.parameters()))
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(512)
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    if tokenizer:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_scores([0.0] * vocab)
        writer.add_token_types([3, 3, 3] + [1] * (vocab - 3))
        writer.add_token_merges([])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
    for name, value in weights.items():
        w = np.array(value.astype(mx.float32))
        if name.startswith("model.layers."):
            layer, rest = name[len("model.layers.") :].split(".", 1)
            module, suffix = rest.rsplit(".", 1)
            if module == "self_attn.q_proj":
                w = permute(w, config["num_attention_heads"])
            elif module == "self_attn.k_proj":
                w = permute(w, config["num_key_value_heads"])
            target = f"blk.{layer}.{BLOCK_NAMES[module]}.{suffix}"
        else:
            target = {
                "model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
            }[name]
        if quantize is not None and w.ndim == 2:
            packed = gguf.quants.quantize(w, quantize)
            writer.add_tensor(target, packed, raw_shape=packed.shape, raw_dtype=quantize)
        else:
            writer.add_tensor(target, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    model = reference_model()
    write_gguf(model, root / "tiny-f32.gguf")
    write_gguf(model, root / "tiny-q8.gguf", quantize=gguf.GGMLQuantizationType.Q8_0)
    return root


def logits(folder: Path | None, tokens: list[int]) -> np.ndarray:
    """The logits of the converted folder, or of the reference model (None)."""
    model = reference_model() if folder is None else load_model(folder)[0]
    return np.array(model(mx.array([tokens])).astype(mx.float32))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_converted_model_gives_the_original_logits(files, tmp_path, dtype):
    out = convert_gguf(files / "tiny-f32.gguf", tmp_path / "model", dtype)
    config = json.loads((out / "config.json").read_text())
    assert config["rope_traditional"] is True and config["tie_word_embeddings"] is True
    tokens = [1, 5, 9, 40, 17, 23, 8]
    tol = 1e-4 if dtype == "float32" else 5e-2
    np.testing.assert_allclose(logits(out, tokens), logits(None, tokens), atol=tol, rtol=tol)


def test_quantized_file_converts_to_float_and_to_mlx_quantized_layers(files, tmp_path):
    tokens = [1, 5, 9, 40, 17]
    expected = logits(None, tokens)
    as_float = convert_gguf(files / "tiny-q8.gguf", tmp_path / "f32", "float32")
    kept = convert_gguf(files / "tiny-q8.gguf", tmp_path / "q8", "quantized")
    assert json.loads((kept / "config.json").read_text())["quantization"] == {
        "group_size": 32,
        "bits": 8,
    }
    model, _, _ = load_model(kept)
    assert type(model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    for folder in (as_float, kept):
        np.testing.assert_allclose(logits(folder, tokens), expected, atol=0.05)


def test_the_tokenizer_is_rebuilt(files, tmp_path):
    out = convert_gguf(files / "tiny-f32.gguf", tmp_path / "model")
    _, tokenizer, _ = load_model(out)
    ids = tokenizer.encode("abc", add_special_tokens=False)
    assert tokenizer.decode(ids) == "abc" and len(ids) == 3


def test_bad_files_and_folders_are_refused_by_name(files, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="junk.gguf"):
        convert_gguf(junk, tmp_path / "out")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        convert_gguf(files / "tiny-f32.gguf", busy)
    assert (busy / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="dtype"):
        convert_gguf(files / "tiny-f32.gguf", tmp_path / "x", "int4")
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("architecture", r"bad\.gguf: architecture 'gpt2' is not supported"),
        ("quantization", r"bad\.gguf: tensor types Q5_0 are not supported"),
        ("truncated", r"bad\.gguf: not a GGUF file MLX can read"),
        ("tokenizer", r"bad\.gguf: GGUF metadata has no tokenizer"),
    ],
)
def test_unsupported_gguf_files_are_refused_by_name(files, tmp_path, kind, message):
    bad = tmp_path / "bad.gguf"
    model = reference_model()
    if kind == "architecture":
        write_gguf(model, bad, arch="gpt2")
    elif kind == "quantization":
        write_gguf(model, bad, quantize=gguf.GGMLQuantizationType.Q5_0)
    elif kind == "truncated":
        data = (files / "tiny-f32.gguf").read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        write_gguf(model, bad, tokenizer=False)
    with pytest.raises(ValueError, match=message):
        convert_gguf(bad, tmp_path / "out")
    with pytest.raises(ValueError, match=message):
        load_model(bad)
    assert not (tmp_path / "out").exists()


def test_load_model_takes_a_gguf_file_and_converts_it_once(files, tmp_path, monkeypatch):
    monkeypatch.setenv("METAPEFT_MODELS", str(tmp_path / "models"))
    tokens = [5, 9, 77, 140, 3, 200]
    model, _, _ = load_model(files / "tiny-f32.gguf")
    np.testing.assert_allclose(
        np.array(model(mx.array([tokens]))), logits(None, tokens)[0:1], rtol=1e-4, atol=1e-4
    )
    folders = list((tmp_path / "models" / "converted").iterdir())
    assert len(folders) == 1 and (folders[0] / "config.json").is_file()
    written = (folders[0] / "model.safetensors").stat().st_mtime_ns
    load_model(files / "tiny-f32.gguf")  # the kept folder, not a second conversion
    assert (folders[0] / "model.safetensors").stat().st_mtime_ns == written


def test_meta_train_lora_takes_a_gguf_file(files, tmp_path, monkeypatch):
    """The exported adapters name the converted folder, which mlx_lm.load takes them on."""
    import mlx_lm

    monkeypatch.setenv("METAPEFT_MODELS", str(tmp_path / "models"))
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(
        "".join(
            json.dumps({"task": f"t{t}", "prompt": f"{w} ->", "completion": f" {w[::-1]}"}) + "\n"
            for t in range(3)
            for w in ("abc", "def", "ghi", "jkl")
        )
    )
    out = tmp_path / "meta-init"
    result = CliRunner().invoke(
        app,
        ["meta-train-lora", "--model", str(files / "tiny-f32.gguf"), "--tasks", str(tasks)]
        + ["--output-dir", str(out), "--steps", "2", "--meta-batch-size", "2", "--rank", "2"]
        + ["--support-size", "2", "--query-size", "2", "--inner-steps", "1"],
    )
    assert result.exit_code == 0, result.output
    converted = json.loads((out / "adapter_config.json").read_text())["model"]
    assert Path(converted).parent == tmp_path / "models" / "converted"
    model, tokenizer = mlx_lm.load(converted, adapter_path=str(out))
    assert model(mx.array([[5, 6, 7]])).shape[:2] == (1, 3)


def test_cli_converts_and_reports_errors(files, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["convert-gguf", str(files / "tiny-f32.gguf"), str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "model.safetensors").is_file()
    result = runner.invoke(app, ["convert-gguf", str(tmp_path / "none.gguf"), str(tmp_path / "n")])
    assert result.exit_code == 1 and "none.gguf" in result.output


SMOLLM2 = models_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.real_model
@pytest.mark.skipif(
    not SMOLLM2.is_file(), reason=f"{SMOLLM2} not fetched (experiments/fetch_smollm2.py)"
)
def test_smollm2_answers_after_conversion(tmp_path):
    from mlx_lm import generate

    out = convert_gguf(SMOLLM2, tmp_path / "smollm2")
    model, tokenizer, _ = load_model(out)
    assert "Paris" in generate(model, tokenizer, prompt="The capital of France is", max_tokens=8)


@pytest.mark.real_model
@pytest.mark.skipif(
    not SMOLLM2.is_file(), reason=f"{SMOLLM2} not fetched (experiments/fetch_smollm2.py)"
)
def test_smollm2_float_conversion_gives_the_files_own_quantized_logits(tmp_path):
    """Dequantized to float32 once, or kept as the file's own weights (Q4_1, and the Q8_0
    tensors among them) in MLX-quantized layers: the two give the same logits, to the
    rounding of float arithmetic."""
    tokens = [[1, 504, 3575, 282, 4649, 314]]
    outs = []
    for dtype in ("float32", "quantized"):
        model, _, _ = load_model(convert_gguf(SMOLLM2, tmp_path / dtype, dtype))
        outs.append(np.array(model(mx.array(tokens)).astype(mx.float32)))
    # 30 blocks of rounding in another order: within 1% of the largest logit, and the
    # same greedy token everywhere.
    assert np.abs(outs[0] - outs[1]).max() <= 0.01 * np.abs(outs[0]).max()
    assert (outs[0].argmax(-1) == outs[1].argmax(-1)).all()


@pytest.mark.real_model
@pytest.mark.skipif(
    not SMOLLM2.is_file(), reason=f"{SMOLLM2} not fetched (experiments/fetch_smollm2.py)"
)
def test_meta_train_lora_on_smollm2_gguf_exports_adapters_mlx_lm_generates_with(
    tmp_path, monkeypatch
):
    import mlx_lm
    from mlx_lm import generate

    monkeypatch.setenv("METAPEFT_MODELS", str(tmp_path / "models"))
    tasks = (
        Path(__file__).resolve().parent.parent / "metapeft" / "configs" / "text_tasks_train.jsonl"
    )
    out = tmp_path / "meta-init"
    result = CliRunner().invoke(
        app,
        ["meta-train-lora", "--model", str(SMOLLM2), "--tasks", str(tasks)]
        + ["--output-dir", str(out), "--steps", "1", "--meta-batch-size", "2", "--rank", "4"]
        + ["--target-modules", "self_attn.q_proj,self_attn.v_proj", "--inner-steps", "1"],
    )
    assert result.exit_code == 0, result.output
    converted = json.loads((out / "adapter_config.json").read_text())["model"]
    model, tokenizer = mlx_lm.load(converted, adapter_path=str(out))
    assert generate(model, tokenizer, prompt="The capital of France is", max_tokens=4)
