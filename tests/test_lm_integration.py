"""The whole mlx-lm path on tiny random models of each architecture, without network:
meta-train (``metapeft meta-train-lora``), load with ``mlx_lm.load(adapter_path=...)``,
generate, and resume fine-tuning a new task with ``mlx_lm.lora``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("mlx_lm")

import mlx.core as mx  # noqa: E402
import mlx_lm  # noqa: E402
import numpy as np  # noqa: E402
from lm_helpers import substitution_tasks  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from metapeft.cli import app  # noqa: E402
from metapeft.lm import MetaLoRAAdapter  # noqa: E402
from metapeft.lm.random_model import ARCHITECTURES, save_random_model  # noqa: E402

pytestmark = pytest.mark.integration

SIZES = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)


def meta_train(tmp_path, model_dir, *extra):
    tasks = substitution_tasks(tmp_path / "tasks.jsonl")
    out = tmp_path / "meta-init"
    result = CliRunner().invoke(
        app,
        [
            "meta-train-lora",
            "--model", str(model_dir),
            "--tasks", str(tasks),
            "--output-dir", str(out),
            "--steps", "3",
            "--meta-batch-size", "2",
            "--support-size", "2",
            "--query-size", "2",
            "--rank", "4",
            *extra,
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "step 3:" in result.output
    return out


def new_task_data(folder):
    folder.mkdir()
    lines = [json.dumps({"text": f"{w}>{w[::-1]}"}) for w in ("abc", "bad", "cab", "hgf")]
    for name in ("train", "valid"):
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def resume_with_mlx_lm(tmp_path, meta_init):
    """``mlx_lm.lora`` fine-tunes a new task from the meta-learned adapters."""
    out = tmp_path / "fine-tuned"
    run = subprocess.run(
        [
            sys.executable, "-m", "mlx_lm", "lora",
            "-c", str(meta_init / "lora_config.yaml"),
            "--train",
            "--data", str(new_task_data(tmp_path / "new-task")),
            "--iters", "2",
            "--batch-size", "2",
            "--val-batches", "1",
            "--adapter-path", str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"Loading fine-tuned weights from {meta_init / 'adapters.safetensors'}" in run.stdout
    resumed = mx.load(str(out / "adapters.safetensors"))
    init = mx.load(str(meta_init / "adapters.safetensors"))
    assert {k: v.shape for k, v in resumed.items()} == {k: v.shape for k, v in init.items()}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_meta_train_export_load_generate(tmp_path, arch):
    model_dir = tmp_path / arch
    save_random_model(model_dir, arch, **SIZES)
    meta_init = meta_train(tmp_path, model_dir, "--algorithm", "fomaml")

    config = json.loads((meta_init / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["lora_parameters"]["rank"] == 4
    assert config["meta_learning"]["algorithm"] == "fomaml"

    model, tokenizer = mlx_lm.load(str(model_dir), adapter_path=str(meta_init))
    loaded = dict(tree_flatten(model.trainable_parameters()))
    for k, v in MetaLoRAAdapter.load(meta_init).weights.items():
        np.testing.assert_array_equal(np.array(loaded[k]), np.array(v), err_msg=k)
    text = mlx_lm.generate(model, tokenizer, "abc>", max_tokens=4)
    assert isinstance(text, str)
    assert len(tokenizer.encode(text, add_special_tokens=False)) <= 4


@pytest.mark.parametrize("algorithm", ["reptile", "maml"])
def test_resume_with_mlx_lm_lora(tmp_path, algorithm):
    model_dir = tmp_path / "llama"
    save_random_model(model_dir, "llama", **SIZES)
    meta_init = meta_train(
        tmp_path, model_dir, "--algorithm", algorithm, "--target-modules",
        "self_attn.q_proj,self_attn.v_proj", "--num-layers", "1",
    )  # fmt: skip
    resume_with_mlx_lm(tmp_path, meta_init)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a != "llama"])
def test_resume_with_mlx_lm_lora_every_architecture(tmp_path, arch):
    model_dir = tmp_path / arch
    save_random_model(model_dir, arch, **SIZES)
    resume_with_mlx_lm(tmp_path, meta_train(tmp_path, model_dir))


def test_quantized_base_with_gradient_checkpointing(tmp_path):
    model_dir = tmp_path / "llama-q4"
    save_random_model(model_dir, "llama", quantize_bits=4, **SIZES)
    meta_init = meta_train(tmp_path, model_dir, "--grad-checkpoint")
    model, tokenizer = mlx_lm.load(str(model_dir), adapter_path=str(meta_init))
    assert isinstance(mlx_lm.generate(model, tokenizer, "abc>", max_tokens=2), str)
    resume_with_mlx_lm(tmp_path, meta_init)


def test_cli_bad_input_is_one_line(tmp_path):
    model_dir = tmp_path / "not-a-model"
    model_dir.mkdir()
    tasks = substitution_tasks(tmp_path / "tasks.jsonl")
    result = CliRunner().invoke(
        app,
        ["meta-train-lora", "--model", str(model_dir), "--tasks", str(tasks),
         "--output-dir", str(tmp_path / "out")],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "no config.json" in result.output and "Traceback" not in result.output
