"""Tracking: the JSONL file always, and a real local MLflow store when configured."""

from __future__ import annotations

import builtins
import json

import mlflow
import pytest

from metapeft import tracking, training
from metapeft.config import MetaLearningConfig

STEP_METRICS = {"query_loss", "support_loss", "param_diff", "steps_per_s", "peak_memory_mb"}


def tiny(tmp_path, **tracking_section):
    return MetaLearningConfig.default(
        profile="dev",
        overrides={
            "training": {"num_iterations": 4, "checkpoint_every": 2, "eval_every": 2},
            "output": {"output_dir": tmp_path / "run"},
            "tracking": tracking_section,
        },
        environ={},
    )


def test_jsonl_is_the_default(tmp_path):
    config = tiny(tmp_path)
    assert isinstance(tracking.open_tracker(config, tmp_path), tracking.JsonlTracker)
    training.train(config)
    rows = tracking.read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert STEP_METRICS <= rows[0].keys()
    assert rows[0]["peak_memory_mb"] > 0
    assert not (tmp_path / "run" / tracking.MLFLOW_RUN_FILE).exists()


def test_mlflow_run_records_params_metrics_and_artifacts(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tiny(tmp_path, backend="mlflow", uri=uri, experiment="tiny")
    training.train(config)
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tiny")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["training.algorithm"] == "maml"
    assert run.data.params["training.num_iterations"] == "4"
    for name in STEP_METRICS:
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == [1, 2, 3, 4], name
    assert len(client.get_metric_history(run.info.run_id, "val_query_loss")) == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts and "checkpoints" in artifacts
    checkpoints = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert checkpoints == {
        "checkpoints/last.safetensors",
        "checkpoints/best.safetensors",
        "checkpoints/best.npz",
    }
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    # the JSONL file is still written beside
    assert len(tracking.read_metrics(tmp_path / "run")) == 4


def test_mlflow_resume_continues_the_same_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tiny(tmp_path, backend="mlflow", uri=uri)
    half = config.model_copy(
        update={"training": config.training.model_copy(update={"num_iterations": 2})}
    )
    training.train(half)
    training.train(config, resume=True)
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("metapeft").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["metapeft.resumed_at_step"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "query_loss")]
    assert steps == [1, 2, 3, 4]


def test_mlflow_file_store(tmp_path, monkeypatch):
    # MLflow 3 keeps its file store behind an opt-in; sqlite is its recommended local store.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    training.train(tiny(tmp_path, backend="mlflow", uri=uri))
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("metapeft").experiment_id])
    assert len(client.get_metric_history(run.info.run_id, "query_loss")) == 4


def test_mlflow_refusing_the_store_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    config = tiny(tmp_path, backend="mlflow", uri=(tmp_path / "mlruns").as_uri())
    with pytest.raises(tracking.TrackingError, match="MLflow store file:") as info:
        training.train(config)
    assert "\n" not in str(info.value)


def test_mlflow_missing_is_a_clear_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name == "mlflow" or name.startswith("mlflow."):
            raise ImportError("No module named 'mlflow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    config = tiny(tmp_path, backend="mlflow", uri="sqlite:///x.db")
    with pytest.raises(tracking.TrackingError, match=r"pip install \"metapeft\[tracking\]\""):
        tracking.open_tracker(config, tmp_path)


def test_read_metrics_names_a_bad_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match="metrics.jsonl: line 2"):
        tracking.read_metrics(tmp_path)
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        tracking.read_metrics(tmp_path / "elsewhere")


def test_resume_truncates_to_the_checkpoint_step(tmp_path):
    tracker = tracking.JsonlTracker(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "query_loss": 1.0}) + "\n" for s in range(1, 6))
    )
    tracker.start(None, resume=True, step=3)
    tracker.log_metrics(4, {"query_loss": 0.5})
    tracker.finish("FINISHED")
    assert [r["step"] for r in tracking.read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_resume_drops_a_torn_last_line_and_names_a_bad_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "query_lo')
    tracker = tracking.JsonlTracker(tmp_path)
    tracker.start(None, resume=True, step=2)
    tracker.finish("FINISHED")
    assert [r["step"] for r in tracking.read_metrics(tmp_path)] == [1, 2]
    path.write_text('{"step": 1}\ngarbage\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl: line 2 is not JSON"):
        tracking.JsonlTracker(tmp_path).start(None, resume=True, step=2)


def test_interrupted_mlflow_run_is_killed_keeps_last_and_resumes(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tiny(tmp_path, backend="mlflow", uri=uri)

    def interrupt(step, metrics):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        training.train(config, on_step=interrupt)
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("metapeft").experiment_id])
    assert run.info.status == "KILLED"
    checkpoints = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert "checkpoints/last.safetensors" in checkpoints
    training.train(config, resume=True)
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "query_loss")]
    assert steps == [1, 2, 3, 4]
