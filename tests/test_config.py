"""Tests of metapeft.config: MetaLearningConfig, its YAML files, profiles, overrides, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlx.nn as nn
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten
from pydantic import ValidationError

from metapeft.config import (
    ConfigError,
    MetaLearningConfig,
    packaged_config,
    packaged_configs,
)
from metapeft.nn import apply_lora
from metapeft.tasks import TaskConfig

SINE_TASK = {
    "task_id": "sine-narrow",
    "task_family": "sinusoid",
    "num_classes": 0,
    "input_dim": 1,
    "support_size": 5,
    "query_size": 15,
    "task_params": {"amplitude_range": [1.0, 2.0]},
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No METAPEFT_* variable of the caller's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("METAPEFT_"):
            monkeypatch.delenv(name)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def config_error(call: Any, *needles: str) -> ConfigError:
    """``call()`` raises ConfigError whose message contains every needle."""
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"expected {needle!r} in the message, got:\n{message}"
    return info.value


# --------------------------------------------------------------------------- defaults


def test_defaults_are_a_short_sinusoid_maml_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = MetaLearningConfig()
    assert (config.task.family, config.task.num_classes, config.task.input_dim) == (
        "sinusoid",
        0,
        1,
    )
    assert (config.task.support_size, config.task.query_size) == (10, 10)
    assert config.task.task_params == {} and config.task.tasks_file is None
    assert config.model.hidden == [40, 40] and config.model.activation == "relu"
    assert config.model.blas_linear is True and config.model.lora is None
    t = config.training
    assert (t.algorithm, t.num_iterations, t.meta_batch_size) == ("maml", 2000, 25)
    assert (t.inner_lr, t.inner_steps, t.outer_lr, t.epsilon) == (0.01, 1, 1e-3, 0.1)
    assert (t.seed, t.checkpoint_every, t.eval_every, t.eval_tasks, t.eval_steps) == (
        0,
        500,
        500,
        100,
        10,
    )
    assert t.loss == "mse"
    assert config.output.output_dir == tmp_path / "runs" / "sinusoid-maml"
    assert (config.tracking.backend, config.tracking.uri, config.tracking.experiment) == (
        "jsonl",
        None,
        "metapeft",
    )
    assert config.layer_sizes == [1, 40, 40, 1]
    (train,) = config.task_configs()
    assert train == TaskConfig("train", "sinusoid", 0, 1, 10, 10)


def test_packaged_default_equals_the_code_defaults() -> None:
    assert MetaLearningConfig.default() == MetaLearningConfig()
    assert MetaLearningConfig.default(environ={}) == MetaLearningConfig()


def test_configs_are_frozen() -> None:
    config = MetaLearningConfig()
    with pytest.raises(ValidationError):
        config.training.inner_lr = 0.5  # type: ignore[misc]


# ------------------------------------------------------------------------ YAML files


def test_yaml_load_sets_given_fields_and_defaults_the_rest(tmp_path: Path) -> None:
    path = write(
        tmp_path / "run.yaml",
        """
task:
  support_size: 5
  task_params: {amplitude_range: [1, 2]}
model:
  hidden: [64]
  activation: tanh
  lora: {rank: 2, target_modules: [layers.0]}
training:
  algorithm: fomaml
  inner_steps: 3
tracking:
  backend: mlflow
  uri: file:///tmp/mlruns
""",
    )
    config = MetaLearningConfig.from_yaml(path)
    assert config.task.support_size == 5 and config.task.query_size == 10
    assert config.task.task_params == {"amplitude_range": [1, 2]}
    assert config.model.hidden == [64] and config.model.activation == "tanh"
    assert config.model.lora is not None
    assert (config.model.lora.rank, config.model.lora.alpha) == (2, 16.0)
    assert config.model.lora.target_modules == ["layers.0"]
    assert (config.training.algorithm, config.training.inner_steps) == ("fomaml", 3)
    assert config.training.num_iterations == 2000
    assert config.tracking.uri == "file:///tmp/mlruns"
    assert config.layer_sizes == [1, 64, 1]


def test_an_empty_file_is_all_defaults(tmp_path: Path) -> None:
    path = write(tmp_path / "empty.yaml", "# nothing set\n")
    assert MetaLearningConfig.from_yaml(path) == MetaLearningConfig()


def test_exponent_floats_without_a_dot_are_floats(tmp_path: Path) -> None:
    text = """
task:
  task_params: {amplitude_range: [1e-1, 5e0]}
training:
  outer_lr: 1e-3
  inner_lr: 5E-2
  epsilon: +2.5e-1
"""
    # PyYAML alone (YAML 1.1) reads these as strings: the reason for the resolver.
    assert yaml.safe_load(text)["training"]["outer_lr"] == "1e-3"
    config = MetaLearningConfig.from_yaml(write(tmp_path / "lr.yaml", text))
    assert config.training.outer_lr == 1e-3 and isinstance(config.training.outer_lr, float)
    assert config.training.inner_lr == 0.05 and config.training.epsilon == 0.25
    assert config.task.task_params == {"amplitude_range": [0.1, 5.0]}
    assert all(isinstance(v, float) for v in config.task.task_params["amplitude_range"])


def test_profile_is_deep_merged_over_the_base(tmp_path: Path) -> None:
    path = write(
        tmp_path / "p.yaml",
        """
task:
  task_params: {amplitude_range: [1, 2], phase_range: [0, 1]}
model:
  hidden: [40, 40]
training:
  num_iterations: 1000
  inner_lr: 0.05
profiles:
  dev:
    task:
      task_params: {phase_range: [0, 0.5]}
    model:
      hidden: [8]
    training:
      num_iterations: 10
  empty:
""",
    )
    base = MetaLearningConfig.from_yaml(path)
    dev = MetaLearningConfig.from_yaml(path, profile="dev")
    assert (base.training.num_iterations, dev.training.num_iterations) == (1000, 10)
    assert dev.training.inner_lr == 0.05  # kept from the base
    assert dev.task.task_params == {"amplitude_range": [1, 2], "phase_range": [0, 0.5]}
    assert dev.model.hidden == [8]  # lists are replaced, not merged
    assert MetaLearningConfig.from_yaml(path, profile="empty") == base


# ------------------------------------------------------------------------- precedence


def layered_file(tmp_path: Path) -> Path:
    """Each of inner_lr, inner_steps, seed, meta_batch_size is set by one more layer."""
    return write(
        tmp_path / "layers.yaml",
        """
training:
  inner_lr: 0.1
  inner_steps: 2
  seed: 3
  meta_batch_size: 4
profiles:
  dev:
    training: {inner_lr: 0.2, inner_steps: 5, seed: 6}
""",
    )


def test_environment_overrides_profile_and_file(tmp_path: Path, monkeypatch) -> None:
    path = layered_file(tmp_path)
    monkeypatch.setenv("METAPEFT_TRAINING__INNER_LR", "0.02")
    monkeypatch.setenv("METAPEFT_TRAINING__SEED", "7")
    config = MetaLearningConfig.from_yaml(path, profile="dev")
    assert config.training.inner_lr == 0.02  # env > profile
    assert config.training.seed == 7
    assert config.training.inner_steps == 5  # profile > file
    assert config.training.meta_batch_size == 4  # file > defaults
    assert config.training.num_iterations == 2000  # defaults
    # environ={} ignores the environment
    assert MetaLearningConfig.from_yaml(path, "dev", environ={}).training.inner_lr == 0.2


def test_cli_overrides_beat_the_environment(tmp_path: Path, monkeypatch) -> None:
    path = layered_file(tmp_path)
    monkeypatch.setenv("METAPEFT_TRAINING__INNER_LR", "0.02")
    monkeypatch.setenv("METAPEFT_TRAINING__SEED", "7")
    overrides = {"training": {"inner_lr": 0.03, "seed": None}, "model": None}
    config = MetaLearningConfig.from_yaml(path, profile="dev", overrides=overrides)
    assert config.training.inner_lr == 0.03  # overrides > env
    assert config.training.seed == 7  # None: not given, the env value stays
    assert config.model.hidden == [40, 40]
    assert MetaLearningConfig.default(overrides={"training": {"inner_lr": 0.5}}).training.inner_lr
    assert MetaLearningConfig.default("dev", {"training": {"num_iterations": 3}}).training == (
        MetaLearningConfig.default("dev").training.model_copy(update={"num_iterations": 3})
    )


def test_environment_values_are_yaml(monkeypatch) -> None:
    monkeypatch.setenv("METAPEFT_MODEL__HIDDEN", "[8, 16]")
    monkeypatch.setenv("METAPEFT_MODEL__BLAS_LINEAR", "false")
    monkeypatch.setenv("METAPEFT_MODEL__LORA__RANK", "2")
    monkeypatch.setenv("METAPEFT_TASK__TASK_PARAMS", '{"x_range": [-1, 1]}')
    monkeypatch.setenv("METAPEFT_TRAINING__OUTER_LR", "1e-4")
    monkeypatch.setenv("METAPEFT_TRAINING__ALGORITHM", "reptile")
    monkeypatch.setenv("METAPEFT_TRACKING__URI", "")  # empty: ignored
    monkeypatch.setenv("METAPEFT_HOME", "/somewhere")  # no "__": not a config field
    config = MetaLearningConfig.default()
    assert config.model.hidden == [8, 16] and config.model.blas_linear is False
    assert config.model.lora is not None and config.model.lora.rank == 2
    assert config.task.task_params == {"x_range": [-1, 1]}
    assert config.training.outer_lr == 1e-4 and config.training.algorithm == "reptile"
    assert config.tracking.uri is None


def test_environment_null_removes_lora(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("METAPEFT_MODEL__LORA", "null")
    config = MetaLearningConfig.from_yaml(packaged_config("lora_sinusoid"))
    assert config.model.lora is None


# ------------------------------------------------------------------------------ paths


def test_tasks_file_is_relative_to_the_yaml_output_dir_to_the_cwd(
    tmp_path: Path, monkeypatch
) -> None:
    write(tmp_path / "conf" / "tasks.json", json.dumps({"tasks": [SINE_TASK]}))
    path = write(
        tmp_path / "conf" / "run.yaml",
        "task: {tasks_file: tasks.json}\noutput: {output_dir: out/run1}\n",
    )
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = MetaLearningConfig.from_yaml(path)
    assert config.task.tasks_file == tmp_path / "conf" / "tasks.json"
    assert config.output.output_dir == elsewhere / "out" / "run1"
    (train,) = config.task_configs()
    assert train.task_id == "sine-narrow" and train.support_size == 5
    (held_out,) = config.task_configs(evaluation=True)
    assert held_out.task_params == SINE_TASK["task_params"]


def test_tasks_file_in_a_profile_is_relative_to_the_yaml(tmp_path: Path, monkeypatch) -> None:
    write(tmp_path / "conf" / "data" / "tasks.json", json.dumps([SINE_TASK]))
    path = write(
        tmp_path / "conf" / "run.yaml",
        "profiles:\n  dev:\n    task: {tasks_file: data/tasks.json}\n",
    )
    monkeypatch.chdir(tmp_path)
    config = MetaLearningConfig.from_yaml(path, profile="dev")
    assert config.task.tasks_file == tmp_path / "conf" / "data" / "tasks.json"


def test_tasks_file_from_env_or_overrides_is_relative_to_the_cwd(
    tmp_path: Path, monkeypatch
) -> None:
    write(tmp_path / "tasks.json", json.dumps([SINE_TASK]))
    path = write(tmp_path / "conf" / "run.yaml", "training: {seed: 1}\n")
    monkeypatch.chdir(tmp_path)
    overrides = {"task": {"tasks_file": "tasks.json"}}
    config = MetaLearningConfig.from_yaml(path, overrides=overrides)
    assert config.task.tasks_file == tmp_path / "tasks.json"
    monkeypatch.setenv("METAPEFT_TASK__TASKS_FILE", "tasks.json")
    assert MetaLearningConfig.from_yaml(path).task.tasks_file == tmp_path / "tasks.json"


def test_eval_task_params_and_query_size_make_the_evaluation_tasks() -> None:
    config = MetaLearningConfig.from_yaml(packaged_config("digits_5way_1shot"))
    (train,) = config.task_configs()
    (held_out,) = config.task_configs(evaluation=True)
    assert train.task_params == {"split": "train"} and held_out.task_params == {"split": "test"}
    assert held_out.query_size == train.query_size == 75
    prod = MetaLearningConfig.default("prod")
    assert prod.task_configs(evaluation=True)[0].query_size == 100
    assert prod.task_configs()[0].query_size == 10


# ---------------------------------------------------------------------------- saving


def test_to_yaml_round_trips(tmp_path: Path, monkeypatch) -> None:
    write(tmp_path / "conf" / "tasks.json", json.dumps([SINE_TASK]))
    source = write(
        tmp_path / "conf" / "run.yaml",
        "task: {tasks_file: tasks.json}\ntraining: {outer_lr: 1e-5}\n"
        "profiles: {dev: {training: {num_iterations: 7}}}\n",
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("METAPEFT_TRAINING__SEED", "11")
    config = MetaLearningConfig.from_yaml(source, "dev", {"model": {"hidden": [8]}})
    saved = config.to_yaml(tmp_path / "runs" / "one" / "config.yaml")
    assert saved == tmp_path / "runs" / "one" / "config.yaml"
    monkeypatch.delenv("METAPEFT_TRAINING__SEED")
    monkeypatch.chdir(tmp_path / "runs")  # absolute paths: the cwd no longer matters
    again = MetaLearningConfig.from_yaml(saved)
    assert again == config
    assert (again.training.seed, again.training.num_iterations) == (11, 7)
    assert again.training.outer_lr == 1e-5 and again.model.hidden == [8]
    data = yaml.safe_load(saved.read_text())
    assert "profiles" not in data and data == config.to_dict()
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()
    assert config.to_dict()["task"]["tasks_file"] == str(tmp_path / "conf" / "tasks.json")


def test_to_yaml_replaces_atomically_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "config.yaml"
    MetaLearningConfig().to_yaml(target)
    first = target.read_text()
    MetaLearningConfig.default("prod").to_yaml(target)  # overwrite an existing file
    assert os.listdir(tmp_path) == ["config.yaml"]
    assert target.read_text() != first
    assert MetaLearningConfig.from_yaml(target) == MetaLearningConfig.default("prod")


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failed_write_leaves_the_old_file_whole(tmp_path: Path, monkeypatch, failing) -> None:
    target = tmp_path / "config.yaml"
    MetaLearningConfig().to_yaml(target)
    before = target.read_bytes()

    def fail(*args: Any) -> None:
        raise OSError(f"simulated {failing} failure")

    monkeypatch.setattr(os, failing, fail)
    with pytest.raises(OSError, match="simulated"):
        MetaLearningConfig.default("dev").to_yaml(target)
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["config.yaml"]


# ---------------------------------------------------------------------------- errors


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_unknown_key_names_file_field_and_a_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path / "typo.yaml", "training:\n  inner_lrr: 0.5\n")
    error = config_error(
        lambda: MetaLearningConfig.from_yaml(path),
        str(path),
        "training.inner_lrr = 0.5",
        "unknown key",
        "did you mean 'inner_lr'?",
    )
    assert error.path == path
    config_error(
        lambda: MetaLearningConfig.from_yaml(write(tmp_path / "s.yaml", "trainig: {}\n")),
        "trainig",
        "did you mean 'training'?",
        "sections: task, model, training, output, tracking",
    )


@pytest.mark.parametrize(
    ("yaml_text", "field", "shown", "why"),
    [
        ("training:\n  num_iterations: many\n", "training.num_iterations", "'many'", "integer"),
        ("training:\n  num_iterations: 2.5\n", "training.num_iterations", "2.5", "integer"),
        ("training:\n  inner_steps: true\n", "training.inner_steps", "True", "integer"),
        ("training:\n  inner_lr: '0.1'\n", "training.inner_lr", "'0.1'", "valid number"),
        ("model:\n  hidden: 40\n", "model.hidden", "40", "valid list"),
        ("model:\n  blas_linear: 1\n", "model.blas_linear", "1", "boolean"),
        ("task:\n  task_params: [1]\n", "task.task_params", "[1]", "dictionary"),
        ("tracking:\n  experiment: 2024\n", "tracking.experiment", "2024", "string"),
    ],
)
def test_wrong_types(tmp_path: Path, yaml_text: str, field: str, shown: str, why: str) -> None:
    path = write(tmp_path / "types.yaml", yaml_text)
    config_error(lambda: MetaLearningConfig.from_yaml(path), str(path), f"{field} = {shown}", why)


@pytest.mark.parametrize(
    ("yaml_text", "field", "shown", "why"),
    [
        ("training:\n  inner_lr: -0.5\n", "training.inner_lr", "-0.5", "greater than 0"),
        ("training:\n  inner_lr: 0\n", "training.inner_lr", "0", "greater than 0"),
        ("training:\n  inner_lr: .inf\n", "training.inner_lr", "inf", "finite"),
        ("training:\n  outer_lr: .nan\n", "training.outer_lr", "nan", "finite"),
        ("training:\n  epsilon: -1\n", "training.epsilon", "-1", "greater than 0"),
        ("training:\n  num_iterations: 0\n", "training.num_iterations", "0", "greater than or"),
        ("training:\n  eval_steps: -1\n", "training.eval_steps", "-1", "greater than or"),
        ("training:\n  seed: -3\n", "training.seed", "-3", "greater than or equal to 0"),
        ("training:\n  algorithm: sgd\n", "training.algorithm", "'sgd'", "'fomaml', 'maml'"),
        ("model:\n  hidden: [40, 0]\n", "model.hidden[1]", "0", "greater than or equal to 1"),
        ("model:\n  activation: sigmoid\n", "model.activation", "'sigmoid'", "'relu', 'tanh'"),
        ("model:\n  lora: {rank: 0}\n", "model.lora.rank", "0", "greater than or equal to 1"),
        ("model:\n  lora: {alpha: 0}\n", "model.lora.alpha", "0", "greater than 0"),
        ("model:\n  lora: {dropout: 1.0}\n", "model.lora.dropout", "1.0", "less than 1"),
        ("model:\n  lora: {target_modules: []}\n", "model.lora.target_modules", "[]", "at least"),
        ("task:\n  support_size: 0\n", "task.support_size", "0", "greater than or equal to 1"),
        ("tracking:\n  backend: wandb\n", "tracking.backend", "'wandb'", "'jsonl' or 'mlflow'"),
    ],
)
def test_out_of_range(tmp_path: Path, yaml_text: str, field: str, shown: str, why: str) -> None:
    path = write(tmp_path / "range.yaml", yaml_text)
    config_error(lambda: MetaLearningConfig.from_yaml(path), str(path), f"{field} = {shown}", why)


def test_every_problem_is_reported_one_per_line(tmp_path: Path) -> None:
    path = write(
        tmp_path / "many.yaml",
        "training:\n  inner_lr: -1\n  seed: -1\nmodel:\n  activation: x\n",
    )
    error = config_error(lambda: MetaLearningConfig.from_yaml(path), "3 problems")
    assert len(error.problems) == 3
    assert str(error).count("\n") == 3
    assert "ValidationError" not in str(error) and "errors.pydantic.dev" not in str(error)


def test_family_rules_are_checked(tmp_path: Path) -> None:
    config_error(
        lambda: MetaLearningConfig.default(overrides={"task": {"family": "digitz"}}),
        "task.family = 'digitz' (from overrides)",
        "known families: digits, sinusoid",
    )
    config_error(
        lambda: MetaLearningConfig.default(overrides={"task": {"input_dim": 3}}),
        "task.input_dim = 3",
        "input_dim must be 1",
    )
    digits = packaged_config("digits_5way_1shot")
    config_error(
        lambda: MetaLearningConfig.from_yaml(digits, overrides={"task": {"support_size": 7}}),
        str(digits),
        "task.support_size = 7",
        "multiple of num_classes=5",
    )
    config_error(
        lambda: MetaLearningConfig.from_yaml(
            digits, overrides={"task": {"eval_task_params": {"split": "tst"}}}
        ),
        "task.eval_task_params = {'split': 'tst'} (from overrides)",
        "'tst'",
    )


def test_loss_must_fit_the_task(monkeypatch) -> None:
    config_error(
        lambda: MetaLearningConfig.default(overrides={"training": {"loss": "cross_entropy"}}),
        "training.loss = 'cross_entropy' (from overrides)",
        "num_classes >= 2",
    )
    digits = packaged_config("digits_5way_1shot")
    monkeypatch.setenv("METAPEFT_TRAINING__LOSS", "mse")
    config_error(
        lambda: MetaLearningConfig.from_yaml(digits),
        "training.loss = 'mse' (from environment variable METAPEFT_TRAINING__LOSS)",
        "5-way task needs cross_entropy",
    )


def test_tasks_file_problems(tmp_path: Path) -> None:
    path = write(tmp_path / "run.yaml", "task: {tasks_file: missing.json}\n")
    config_error(
        lambda: MetaLearningConfig.from_yaml(path),
        str(path),
        f"task.tasks_file = '{tmp_path / 'missing.json'}'",
        "does not point to a file",
    )
    write(tmp_path / "bad.json", "[{]")
    path = write(tmp_path / "run.yaml", "task: {tasks_file: bad.json}\n")
    config_error(lambda: MetaLearningConfig.from_yaml(path), "task.tasks_file", "not valid JSON")
    write(tmp_path / "digits.json", json.dumps([{**SINE_TASK, "input_dim": 2}]))
    path = write(tmp_path / "run.yaml", "task: {tasks_file: digits.json}\n")
    config_error(lambda: MetaLearningConfig.from_yaml(path), "task.tasks_file", "input_dim")


def test_unknown_profile_lists_the_known_ones(tmp_path: Path) -> None:
    config_error(
        lambda: MetaLearningConfig.default(profile="staging"),
        "sinusoid_maml.yaml",
        "unknown profile 'staging'",
        "dev, prod",
    )
    path = write(tmp_path / "flat.yaml", "training: {seed: 1}\n")
    config_error(lambda: MetaLearningConfig.from_yaml(path, "dev"), str(path), "no 'profiles:'")
    path = write(tmp_path / "p.yaml", "profiles: {dev: [1]}\n")
    config_error(lambda: MetaLearningConfig.from_yaml(path, "dev"), "profiles.dev", "mapping")
    path = write(tmp_path / "p.yaml", "profiles: {dev: {training: {sed: 1}}}\n")
    config_error(
        lambda: MetaLearningConfig.from_yaml(path, "dev"),
        f"{path} (profile 'dev')",
        "training.sed = 1 (from profile 'dev')",
        "did you mean 'seed'?",
    )


def test_bad_environment_variables_are_named(monkeypatch) -> None:
    monkeypatch.setenv("METAPEFT_TRAINING__INNER_LR", "fast")
    config_error(
        MetaLearningConfig.default,
        "sinusoid_maml.yaml",
        "training.inner_lr = 'fast' (from environment variable METAPEFT_TRAINING__INNER_LR)",
        "valid number",
    )
    monkeypatch.setenv("METAPEFT_TRAINING__INNER_LR", "[0.1,")
    config_error(
        MetaLearningConfig.default, "METAPEFT_TRAINING__INNER_LR='[0.1,'", "not a YAML value"
    )
    monkeypatch.delenv("METAPEFT_TRAINING__INNER_LR")
    monkeypatch.setenv("METAPEFT_TRAINING__INNER_LRR", "0.1")
    config_error(
        MetaLearningConfig.default,
        "training.inner_lrr = 0.1 (from environment variable METAPEFT_TRAINING__INNER_LRR)",
        "did you mean 'inner_lr'?",
    )
    monkeypatch.delenv("METAPEFT_TRAINING__INNER_LRR")
    monkeypatch.setenv("METAPEFT_TRAINING____SEED", "1")
    config_error(MetaLearningConfig.default, "METAPEFT_TRAINING____SEED", "two underscores")
    monkeypatch.delenv("METAPEFT_TRAINING____SEED")
    monkeypatch.setenv("METAPEFT_MODEL__LORA", "null")
    monkeypatch.setenv("METAPEFT_MODEL__LORA__RANK", "4")
    config_error(
        MetaLearningConfig.default,
        "METAPEFT_MODEL__LORA and METAPEFT_MODEL__LORA__RANK set the same field",
    )


def test_file_problems(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    config_error(lambda: MetaLearningConfig.from_yaml(missing), "not found", str(missing))
    config_error(lambda: MetaLearningConfig.from_yaml(tmp_path), "folder", str(tmp_path))
    path = write(tmp_path / "broken.yaml", "training:\n  inner_lr: [0.1\nmodel: {}\n")
    config_error(lambda: MetaLearningConfig.from_yaml(path), str(path), "invalid YAML", "line 3")
    path = write(tmp_path / "twice.yaml", "training:\n  seed: 1\n  seed: 2\n")
    config_error(lambda: MetaLearningConfig.from_yaml(path), str(path), "line 3", "'seed' twice")
    for text, kind in [("- task\n- model\n", "list"), ("just text\n", "str")]:
        path = write(tmp_path / "top.yaml", text)
        config_error(
            lambda p=path: MetaLearningConfig.from_yaml(p), str(path), "top level", f"got {kind}"
        )
    path = write(tmp_path / "prof.yaml", "profiles: [dev]\n")
    config_error(lambda: MetaLearningConfig.from_yaml(path), str(path), "'profiles' must be")


def test_bad_overrides_and_dicts() -> None:
    config_error(
        lambda: MetaLearningConfig.default(overrides={"training": {"meta_batch_size": 0}}),
        "training.meta_batch_size = 0 (from overrides)",
    )
    config_error(lambda: MetaLearningConfig.default(overrides=[("a", 1)]), "overrides must be")
    config_error(
        lambda: MetaLearningConfig.from_dict({"model": {"hidden": [-1]}}),
        "model.hidden[0] = -1",
    )
    config_error(lambda: MetaLearningConfig.from_dict([1]), "mapping of sections")


# ------------------------------------------------------------------ packaged configs


def profiles_of(name: str) -> list[str | None]:
    data = yaml.safe_load(packaged_config(name).read_text())
    return [None, *(data.get("profiles") or {})]


PACKAGED = [(name, profile) for name in packaged_configs() for profile in profiles_of(name)]


def test_the_expected_configs_are_packaged() -> None:
    assert {"sinusoid_maml", "digits_5way_1shot", "lora_sinusoid"} <= set(packaged_configs())
    assert packaged_config("lora_sinusoid.yaml") == packaged_config("lora_sinusoid")
    assert packaged_config("sinusoid_maml").is_file()
    config_error(lambda: packaged_config("nope"), "'nope'", "sinusoid_maml")
    for name in packaged_configs():
        assert {"dev", "prod"} <= set(profiles_of(name)[1:]), name


@pytest.mark.parametrize(("name", "profile"), PACKAGED, ids=[f"{n}-{p}" for n, p in PACKAGED])
def test_every_packaged_config_and_profile_validates(name: str, profile: str | None) -> None:
    config = MetaLearningConfig.from_yaml(packaged_config(name), profile)
    assert config.task_configs() and config.task_configs(evaluation=True)
    if profile == "dev":
        assert config.training.num_iterations <= 500
    round_trip = MetaLearningConfig.from_dict(config.to_dict())
    assert round_trip == config


def test_packaged_config_contents() -> None:
    for profile, steps in [("dev", 200), ("prod", 20000)]:
        config = MetaLearningConfig.default(profile)
        assert config.training.num_iterations == steps
        assert config.training.algorithm == "maml" and config.layer_sizes == [1, 40, 40, 1]
        assert config.training.outer_lr == 1e-3
    digits = MetaLearningConfig.from_yaml(packaged_config("digits_5way_1shot"))
    assert (digits.task.family, digits.task.num_classes, digits.task.input_dim) == (
        "digits",
        5,
        64,
    )
    assert (digits.task.support_size, digits.task.query_size) == (5, 75)
    assert digits.task.task_params == {"split": "train"}
    assert digits.task.eval_task_params == {"split": "test"}
    assert digits.model.hidden == [128, 128] and digits.training.loss == "cross_entropy"
    t = digits.training
    assert (t.inner_lr, t.inner_steps, t.meta_batch_size) == (0.1, 5, 16)
    assert digits.layer_sizes == [64, 128, 128, 5]
    lora = MetaLearningConfig.from_yaml(packaged_config("lora_sinusoid"))
    assert lora.training.algorithm == "reptile" and lora.task.family == "sinusoid"
    assert lora.model.lora is not None
    assert (lora.model.lora.rank, lora.model.lora.alpha) == (4, 8.0)


def test_lora_targets_are_the_hidden_layers_of_the_mlp() -> None:
    config = MetaLearningConfig.from_yaml(packaged_config("lora_sinusoid"))
    sizes = config.layer_sizes
    layers: list[nn.Module] = []
    for d_in, d_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    lora = config.model.lora
    assert lora is not None
    model = apply_lora(model, lora.rank, lora.alpha, lora.dropout, lora.target_modules)
    trainable = sorted(k for k, _ in tree_flatten(model.trainable_parameters()))
    assert trainable == [
        "layers.0.lora_a",
        "layers.0.lora_b",
        "layers.2.lora_a",
        "layers.2.lora_b",
    ]


def test_validation_tasks_choose_best_and_evaluation_tasks_are_other_ones() -> None:
    """A run chooses ``best`` on the validation tasks (digits: the val split) and
    ``metapeft evaluate`` reports on the evaluation tasks (the test split): never the
    same tasks, also where both come from one distribution (other draws)."""
    from metapeft import training

    digits = MetaLearningConfig.from_yaml(packaged_config("digits_5way_1shot"))
    assert digits.task_configs(validation=True)[0].task_params == {"split": "val"}
    assert digits.task_configs(evaluation=True)[0].task_params == {"split": "test"}
    sine = MetaLearningConfig.default("dev")
    val_configs, eval_configs = (
        sine.task_configs(validation=True),
        sine.task_configs(evaluation=True),
    )
    assert [c.task_params for c in val_configs] == [c.task_params for c in eval_configs]
    _, val, held_out = training.task_distributions(sine)
    a, b = val.sample(20), held_out.sample(20)
    assert not np.allclose(np.array(a.support_y), np.array(b.support_y))
    with pytest.raises(ValueError, match="not both"):
        sine.task_configs(evaluation=True, validation=True)
    config_error(
        lambda: MetaLearningConfig.from_yaml(
            packaged_config("digits_5way_1shot"),
            overrides={"task": {"val_task_params": {"split": "dev"}}},
        ),
        "task.val_task_params",
        "for validation",
    )
