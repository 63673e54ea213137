"""export, plot, registry, toolkit and the command line's error cases, through typer's
CliRunner and as real subprocesses of the installed entry point."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from metapeft import toolkit
from metapeft.cli import app
from metapeft.config import packaged_config

runner = CliRunner()
TINY = ["--profile", "dev", "--num-iterations", "4", "--checkpoint-every", "2"]


def run(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def command():
    exe = shutil.which("metapeft")
    return [exe] if exe else [sys.executable, "-m", "metapeft"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    result = run("train", *TINY, "--output-dir", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "lora"
    result = run("train", "--config", packaged_config("lora_sinusoid"), *TINY, "--output-dir", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["info"],
        ["validate"],
        ["train"],
        ["evaluate"],
        ["export"],
        ["plot"],
        ["registry", "register"],
        ["registry", "list"],
        ["registry", "load"],
    ],
)
def test_help_everywhere(args):
    result = run(*args, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_help_lists_the_new_commands():
    output = run("--help").output
    for name in ("export", "plot", "registry", "toolkit"):
        assert name in output


# ------------------------------------------------------------------------- export


def test_export_npz(trained, tmp_path):
    target = tmp_path / "params.npz"
    result = run("export", trained / "checkpoints" / "last.safetensors", "-o", target)
    assert result.exit_code == 0, result.output
    assert sorted(mx.load(str(target))) == sorted(
        f"layers.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")
    )


def test_export_mlx_lm_adapters(lora_run, tmp_path):
    target = tmp_path / "adapters"
    ckpt = lora_run / "checkpoints" / "best.safetensors"
    result = run("export", ckpt, "--format", "mlx-lm", "-o", target)
    assert result.exit_code == 0, result.output
    weights = mx.load(str(target / "adapters.safetensors"))
    assert sorted(weights) == [
        "layers.0.lora_a",
        "layers.0.lora_b",
        "layers.2.lora_a",
        "layers.2.lora_b",
    ]
    settings = json.loads((target / "adapter_config.json").read_text())
    assert settings["fine_tune_type"] == "lora"
    assert settings["lora_parameters"] == {
        "rank": 4,
        "scale": 2.0,
        "dropout": 0.0,
        "keys": ["layers.0", "layers.2"],
    }


def test_export_mlx_lm_needs_lora(trained):
    result = run("export", trained / "checkpoints" / "last.safetensors", "--format", "mlx-lm")
    assert result.exit_code == 1
    assert "no LoRA adapters" in result.output
    result = run("export", trained / "checkpoints" / "last.safetensors", "--format", "onnx")
    assert result.exit_code == 1 and "unknown export format 'onnx'" in result.output


def test_a_checkpoint_alone_is_enough_to_evaluate_and_export(lora_run, tmp_path):
    """The checkpoint records its resolved config: copied out of its run folder, it
    still evaluates and exports."""
    alone = tmp_path / "elsewhere" / "best.safetensors"
    alone.parent.mkdir()
    shutil.copy(lora_run / "checkpoints" / "best.safetensors", alone)
    result = run("evaluate", alone, "--tasks", "10", "--steps", "2")
    assert result.exit_code == 0, result.output
    assert "query loss after 2 steps on 10 tasks" in result.output
    result = run("export", alone, "--format", "mlx-lm", "-o", tmp_path / "adapters")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "adapters" / "adapters.safetensors").is_file()
    assert run("export", alone).exit_code == 0
    assert alone.with_suffix(".npz").is_file()


def test_export_help_documents_the_formats():
    result = run("export", "--help")
    assert result.exit_code == 0
    assert "npz" in result.output and "mlx-lm" in result.output


# --------------------------------------------------------------------------- plot


def test_plot_writes_a_png(trained, tmp_path):
    target = tmp_path / "curves.png"
    result = run("plot", trained, "--output", target)
    assert result.exit_code == 0, result.output
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_a_folder_without_metrics(tmp_path):
    result = run("plot", tmp_path)
    assert result.exit_code == 1
    assert "no metrics file" in result.output


# ----------------------------------------------------------------------- registry


def test_local_registry_register_list_load(trained, tmp_path):
    index = tmp_path / "registry.json"
    ckpt = trained / "checkpoints" / "best.safetensors"
    for _ in range(2):
        result = run(
            "registry", "register", "sine", ckpt, "--tag", "stage=dev", "--metadata",
            "note=tiny", "--index", index,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
    assert "sine version 2" in result.output
    data = json.loads(index.read_text())
    assert [v["version"] for v in data["models"]["sine"]] == [1, 2]
    listed = run("registry", "list", "--index", index)
    assert listed.exit_code == 0 and "stage=dev" in listed.output
    loaded = run("registry", "load", "sine", "--version", "1", "--index", index)
    assert loaded.exit_code == 0, loaded.output
    record = json.loads(loaded.output)
    assert record["path"] == str(ckpt.resolve())
    assert record["metadata"] == {
        "algorithm": "maml",
        "step": 4,
        "metapeft_version": "0.1.0",
        "note": "tiny",
    }
    assert record["tags"] == {"stage": "dev"}
    missing = run("registry", "load", "sine", "--version", "7", "--index", index)
    assert missing.exit_code == 1 and "no version 7" in missing.output
    bad = run("registry", "register", "sine", ckpt, "--tag", "oops", "--index", index)
    assert bad.exit_code == 1 and "expected KEY=VALUE" in bad.output


def test_mlflow_registry(trained, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"METAPEFT_TRACKING__BACKEND": "mlflow", "METAPEFT_TRACKING__URI": uri}
    ckpt = trained / "checkpoints" / "last.safetensors"
    result = run("registry", "register", "sine", ckpt, "--tag", "stage=dev", env=env)
    assert result.exit_code == 0, result.output
    loaded = run("registry", "load", "sine", env=env)
    assert loaded.exit_code == 0, loaded.output
    record = json.loads(loaded.output)
    assert record["version"] == 1 and record["tags"] == {"stage": "dev"}
    assert record["metadata"]["algorithm"] == "maml"
    import mlflow

    (version,) = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions(
        "name='sine'"
    )
    assert version.source == str(ckpt.resolve())


def test_train_tracks_to_mlflow_when_configured(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"METAPEFT_TRACKING__BACKEND": "mlflow", "METAPEFT_TRACKING__URI": uri}
    result = run("train", *TINY, "--output-dir", tmp_path / "run", env=env)
    assert result.exit_code == 0, result.output
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    (run_,) = client.search_runs([client.get_experiment_by_name("metapeft").experiment_id])
    assert run_.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_.info.run_id, "query_loss")] == [
        1,
        2,
        3,
        4,
    ]


def test_register_a_corrupt_checkpoint_names_it(trained, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((trained / "checkpoints" / "last.safetensors").read_bytes()[:100])
    result = run("registry", "register", "sine", bad, "--index", tmp_path / "r.json")
    assert result.exit_code == 1
    assert "bad.safetensors" in result.output
    assert not (tmp_path / "r.json").exists()


# ------------------------------------------------------------------------ toolkit


def test_toolkit_discovers_this_project():
    projects = toolkit.discover()
    assert projects["meta-learning-peft"].value == "metapeft.cli:app"
    assert "info" in toolkit.load("meta-learning-peft").commands


def test_toolkit_dispatches_namespace_command():
    result = run("toolkit", "meta-learning-peft:info")
    assert result.exit_code == 0, result.output
    assert "backend" in result.output


def test_toolkit_help_lists_projects_and_commands():
    for args in ([], ["--help"]):
        result = run("toolkit", *args)
        assert result.exit_code == 0, result.output
        assert "meta-learning-peft:train" in result.output
    result = run("toolkit", "meta-learning-peft:train", "--help")
    assert result.exit_code == 0
    assert "metapeft toolkit meta-learning-peft:train" in result.output
    assert "--num-iterations" in result.output


@pytest.mark.parametrize(
    "target, message",
    [
        ("nowhere:info", "no toolkit project 'nowhere'"),
        ("meta-learning-peft:fly", "has no command 'fly'"),
        ("info", "expected namespace:command"),
    ],
)
def test_toolkit_bad_targets(target, message):
    result = run("toolkit", target)
    assert result.exit_code == 1
    assert message in result.output


# ------------------------------------------------------------------- error cases


def test_bad_env_override_is_one_line(tmp_path):
    env = {"METAPEFT_TRAINING__INNER_LR": "fast"}
    result = run("train", *TINY, "--output-dir", tmp_path / "run", env=env)
    assert result.exit_code == 1
    assert "training.inner_lr" in result.output and "METAPEFT_TRAINING__INNER_LR" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run("train", *TINY, "--output-dir", blocker / "run")
    assert result.exit_code == 1
    assert "is not writable" in result.output and "a-file" in result.output
    assert "Traceback" not in result.output
    assert blocker.read_text() == "not a folder"


def test_mlflow_store_error_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    env = {
        "METAPEFT_TRACKING__BACKEND": "mlflow",
        "METAPEFT_TRACKING__URI": (tmp_path / "mlruns").as_uri(),
    }
    result = run("train", *TINY, "--output-dir", tmp_path / "run", env=env)
    assert result.exit_code == 1
    assert "MLflow store file:" in result.output
    assert "Traceback" not in result.output


# ------------------------------------------------------------ real subprocesses


def test_every_command_runs_as_a_subprocess(trained, lora_run, tmp_path):
    out = tmp_path / "run"
    index = tmp_path / "registry.json"
    ckpt = out / "checkpoints" / "best.safetensors"
    steps = [
        ["validate"],
        ["train", "--profile", "dev", "--num-iterations", "2", "--output-dir", out],
        ["evaluate", ckpt, "--tasks", "4", "--steps", "1"],
        ["export", ckpt, "-o", tmp_path / "p.npz"],
        ["export", lora_run / "checkpoints" / "best.safetensors", "-f", "mlx-lm",
         "-o", tmp_path / "adapters"],
        ["plot", out],
        ["registry", "register", "m", ckpt, "--index", index],
        ["registry", "list", "--index", index],
        ["registry", "load", "m", "--index", index],
        ["toolkit", "meta-learning-peft:info"],
        ["toolkit", "--help"],
    ]  # fmt: skip
    for args in steps:
        result = subprocess.run(
            [*command(), *map(str, args)], capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, (args, result.stdout, result.stderr)
    assert (out / "loss.png").is_file()
    failed = subprocess.run(
        [*command(), "train", "--config", tmp_path / "missing.yaml"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 1
    assert failed.stderr.strip().count("\n") == 0 and "missing.yaml" in failed.stderr
