"""``metapeft train`` with an ``lm`` config section: the one run loop meta-trains LoRA
adapters of an mlx-lm model with the checkpoints, metrics, Ctrl-C and resume of every
run, exports mlx-lm adapters, and ``meta-train-lora`` is a front-end to it."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import yaml
from lm_helpers import substitution_tasks
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from conftest import interrupt_training

pytest.importorskip("mlx_lm")

from metapeft import checkpoint  # noqa: E402
from metapeft.cli import app  # noqa: E402
from metapeft.lm.random_model import save_random_model  # noqa: E402

runner = CliRunner()
SIZES = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def lm_config(tmp_path_factory):
    """A YAML config with an lm section over a tiny random Llama, paths relative to it."""
    root = tmp_path_factory.mktemp("lm-run")
    save_random_model(root / "tiny-llama", "llama", **SIZES)
    substitution_tasks(root / "tasks.jsonl")
    substitution_tasks(root / "val.jsonl", num_tasks=3, seed=1)
    config = {
        "lm": {
            "model": "tiny-llama",
            "tasks_file": "tasks.jsonl",
            "val_tasks_file": "val.jsonl",
            "support_size": 2,
            "query_size": 2,
            "lora": {"rank": 4, "target_modules": ["self_attn.q_proj", "self_attn.v_proj"]},
        },
        "training": {
            "algorithm": "fomaml",
            "num_iterations": 6,
            "meta_batch_size": 3,
            "inner_lr": 0.1,
            "inner_steps": 1,
            "checkpoint_every": 3,
            "eval_every": 3,
            "eval_tasks": 2,
            "eval_steps": 1,
        },
    }
    path = root / "lm.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def adapters(folder):
    return dict(tree_flatten(mx.load(str(folder / "adapters.safetensors"))))


def assert_same_meta(a, b, rtol=1e-5, atol=1e-6):
    fa = dict(tree_flatten(checkpoint.load(a)[0]["meta"]))
    fb = dict(tree_flatten(checkpoint.load(b)[0]["meta"]))
    assert fa.keys() == fb.keys()
    for key in fa:
        np.testing.assert_allclose(np.array(fa[key]), np.array(fb[key]), rtol=rtol, atol=atol)


def test_an_lm_run_writes_metrics_checkpoints_and_mlx_lm_adapters(lm_config, tmp_path):
    out = tmp_path / "run"
    result = run("train", "--config", lm_config, "--output-dir", out)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 7))
    assert all(np.isfinite(m["query_loss"]) and m["seconds"] > 0 for m in lines)
    assert "val_query_loss" in lines[2] and "val_query_loss" in lines[5]
    for name in ("last", "best"):
        meta = checkpoint.load(out / "checkpoints" / f"{name}.safetensors")[0]["meta"]
        assert all(k.endswith(("lora_a", "lora_b")) for k, _ in tree_flatten(meta))
    # The adapters in mlx-lm's layout, the run's final meta-parameters.
    final = dict(tree_flatten(checkpoint.load(out / "checkpoints" / "last.safetensors")[0]))
    exported = adapters(out)
    assert len(exported) == 8  # q and v of 2 blocks, lora_a and lora_b
    for key, value in exported.items():
        np.testing.assert_array_equal(np.array(value), np.array(final[f"meta.params.{key}"]))
    settings = json.loads((out / "adapter_config.json").read_text())
    assert settings["lora_parameters"]["rank"] == 4
    assert settings["meta_learning"]["algorithm"] == "fomaml"
    assert yaml.safe_load((out / "lora_config.yaml").read_text())["fine_tune_type"] == "lora"
    import mlx_lm

    model, _ = mlx_lm.load(str(lm_config.parent / "tiny-llama"), adapter_path=str(out))
    assert model(mx.array([[5, 6, 7]])).shape[:2] == (1, 3)
    # The checkpoint alone evaluates: it records its config.
    alone = tmp_path / "alone.safetensors"
    shutil.copy(out / "checkpoints" / "best.safetensors", alone)
    result = run("evaluate", alone, "--tasks", "3", "--steps", "1")
    assert result.exit_code == 0, result.output


def test_an_lm_run_resumes_to_the_uninterrupted_adapters(lm_config, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run("train", "--config", lm_config, "--output-dir", straight).exit_code == 0
    first = run("train", "--config", lm_config, "--num-iterations", "3", "--output-dir", resumed)
    assert first.exit_code == 0, first.output
    again = run("train", "--config", lm_config, "--output-dir", resumed, "--resume")
    assert again.exit_code == 0, again.output
    assert_same_meta(
        straight / "checkpoints" / "last.safetensors", resumed / "checkpoints" / "last.safetensors"
    )
    a, b = adapters(straight), adapters(resumed)
    for key in a:
        np.testing.assert_allclose(np.array(a[key]), np.array(b[key]), rtol=1e-5, atol=1e-6)


def test_ctrl_c_on_an_lm_run_saves_last_and_resume_matches(lm_config, tmp_path):
    """SIGINT a real process meta-training the tiny Llama, resume it, and land on the
    uninterrupted run's adapters."""
    args = ["train", "--config", str(lm_config), "--num-iterations", "400"]
    args += ["--checkpoint-every", "5000", "--eval-every", "5000"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run(*args, "--output-dir", straight).exit_code == 0
    interrupt_training(args, killed, after_steps=5)
    step = checkpoint.read_metadata(killed / "checkpoints" / "last.safetensors")["step"]
    assert 5 <= step < 400
    resumed = run(*args, "--output-dir", killed, "--resume")
    assert resumed.exit_code == 0, resumed.output
    last = "checkpoints/last.safetensors"
    assert_same_meta(straight / last, killed / last)


def test_meta_train_lora_is_the_same_run(lm_config, tmp_path):
    """The meta-train-lora command with the config's settings writes the same adapters
    as 'metapeft train --config'."""
    via_config = tmp_path / "config-run"
    settings = ["--num-iterations", "4", "--checkpoint-every", "4", "--eval-every", "4"]
    result = run("train", "--config", lm_config, *settings, "--output-dir", via_config)
    assert result.exit_code == 0, result.output
    root = lm_config.parent
    via_command = tmp_path / "command-run"
    result = run(
        "meta-train-lora",
        "--model", root / "tiny-llama",
        "--tasks", root / "tasks.jsonl",
        "--output-dir", via_command,
        "--algorithm", "fomaml",
        "--rank", "4",
        "--target-modules", "self_attn.q_proj,self_attn.v_proj",
        "--steps", "4",
        "--meta-batch-size", "3",
        "--support-size", "2",
        "--query-size", "2",
        "--inner-lr", "0.1",
        "--inner-steps", "1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "step 4:" in result.output
    a, b = adapters(via_config), adapters(via_command)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(np.array(a[key]), np.array(b[key]))
