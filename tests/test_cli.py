"""The command line, through typer's CliRunner and once as a real subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import interrupt_training
from metapeft import checkpoint
from metapeft.cli import app

runner = CliRunner()
FAST = ["--profile", "dev", "--num-iterations", "6", "--checkpoint-every", "3"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_lists_commands():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("info", "validate", "train", "evaluate"):
        assert command in result.output


def test_info_reports_backend_and_extension():
    result = run("info")
    assert result.exit_code == 0, result.output
    assert "backend" in result.output and "loaded" in result.output


def test_validate_default_config():
    result = run("validate")
    assert result.exit_code == 0, result.output
    assert "MISMATCH" not in result.output


def test_train_writes_metrics_checkpoints_and_config(tmp_path):
    out = tmp_path / "run"
    result = run("train", *FAST, "--output-dir", out)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 7))
    assert {"query_loss", "support_loss", "param_diff", "steps_per_s"} <= lines[-1].keys()
    assert (out / "checkpoints" / "last.safetensors").is_file()
    assert (out / "checkpoints" / "best.safetensors").is_file()
    assert set(mx.load(str(out / "checkpoints" / "best.npz"))) == {
        "layers.0.weight",
        "layers.0.bias",
        "layers.2.weight",
        "layers.2.bias",
        "layers.4.weight",
        "layers.4.bias",
    }
    assert (out / "config.yaml").is_file()
    logs = list(out.glob("train-*.log"))
    assert len(logs) == 1 and "machine:" in logs[0].read_text()
    assert "summary" in result.output


def test_resume_reaches_the_uninterrupted_parameters(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run("train", *FAST, "--output-dir", straight).exit_code == 0
    first = run(
        "train",
        "--profile",
        "dev",
        "--num-iterations",
        "3",
        "--checkpoint-every",
        "3",
        "--output-dir",
        resumed,
    )
    assert first.exit_code == 0, first.output
    again = run("train", *FAST, "--output-dir", resumed, "--resume")
    assert again.exit_code == 0, again.output
    a, _ = checkpoint.load(straight / "checkpoints" / "last.safetensors")
    b, _ = checkpoint.load(resumed / "checkpoints" / "last.safetensors")
    from mlx.utils import tree_flatten

    fa, fb = dict(tree_flatten(a["meta"])), dict(tree_flatten(b["meta"]))
    assert fa.keys() == fb.keys()
    for key in fa:
        np.testing.assert_allclose(np.array(fa[key]), np.array(fb[key]), rtol=1e-6, atol=1e-7)
    steps = [
        json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 7))


def test_evaluate_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert run("train", *FAST, "--output-dir", out).exit_code == 0
    result = run(
        "evaluate", out / "checkpoints" / "best.safetensors", "--tasks", "20", "--steps", "2"
    )
    assert result.exit_code == 0, result.output
    assert "query loss after 2 steps on 20 tasks" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--config", "missing.yaml"], "missing.yaml"),
        (["train", "--profile", "nope"], "nope"),
        (["evaluate", "nowhere/checkpoints/last.safetensors"], "no such checkpoint file"),
    ],
)
def test_user_errors_exit_1_with_one_line(tmp_path, args, message):
    result = run(*args)
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_bad_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed\n")
    result = run("train", "--config", bad)
    assert result.exit_code == 1
    assert "bad.yaml" in result.output


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    assert run("train", *FAST, "--output-dir", out).exit_code == 0
    path = out / "checkpoints" / "last.safetensors"
    data = bytearray(path.read_bytes())
    data[-2] ^= 0xFF
    path.write_bytes(bytes(data))
    result = run("evaluate", path)
    assert result.exit_code == 1
    assert "corrupt" in result.output


def test_installed_entry_point_runs_as_a_subprocess():
    exe = shutil.which("metapeft")
    command = [exe] if exe else [sys.executable, "-m", "metapeft"]
    result = subprocess.run([*command, "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "mlx" in result.stdout
    module = subprocess.run(
        [sys.executable, "-m", "metapeft", "--help"], capture_output=True, text=True, timeout=120
    )
    assert module.returncode == 0 and "train" in module.stdout


def test_ctrl_c_mid_run_saves_last_and_resume_matches(tmp_path):
    """SIGINT a real training process, resume it, and land on the uninterrupted run."""
    from mlx.utils import tree_flatten

    args = ["train", "--profile", "dev", "--num-iterations", "2000", "--checkpoint-every", "5000"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run(*args, "--output-dir", straight).exit_code == 0
    interrupt_training(args, killed, after_steps=20)
    _, meta = checkpoint.load(killed / "checkpoints" / "last.safetensors")
    assert 20 <= meta["step"] < 2000
    resumed = run(*args, "--output-dir", killed, "--resume")
    assert resumed.exit_code == 0, resumed.output
    a, _ = checkpoint.load(straight / "checkpoints" / "last.safetensors")
    b, _ = checkpoint.load(killed / "checkpoints" / "last.safetensors")
    fa, fb = dict(tree_flatten(a["meta"])), dict(tree_flatten(b["meta"]))
    for key in fa:
        np.testing.assert_allclose(np.array(fa[key]), np.array(fb[key]), rtol=1e-5, atol=1e-6)


def test_first_ctrl_c_waits_for_the_step_boundary_second_stops_now():
    import os
    import signal

    from metapeft.training import StepBoundaryInterrupt

    interrupt = StepBoundaryInterrupt()
    interrupt.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupt.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        interrupt.uninstall()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
