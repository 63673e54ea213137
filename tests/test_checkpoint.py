"""Checkpoint files: the .npz export and the errors of a foreign checkpoint."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import metapeft
from metapeft import checkpoint


def test_npz_round_trips_into_a_model(tmp_path):
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    path = tmp_path / "best.npz"
    checkpoint.save_npz(path, model.trainable_parameters())
    assert sorted(mx.load(str(path))) == [
        "layers.0.bias",
        "layers.0.weight",
        "layers.2.bias",
        "layers.2.weight",
    ]
    other = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    other.load_weights(str(path))
    for (name, got), (_, saved) in zip(
        tree_flatten(other.parameters()), tree_flatten(model.parameters()), strict=True
    ):
        np.testing.assert_array_equal(np.array(got), np.array(saved), err_msg=name)
    # the same weights, so the same outputs (up to the rounding of the CPU matmul, whose
    # order of summation may depend on where the arrays sit in memory)
    x = mx.ones((4, 2))
    np.testing.assert_allclose(np.array(other(x)), np.array(model(x)), rtol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["best.npz"]  # no temporary file left


def test_npz_needs_the_suffix(tmp_path):
    with pytest.raises(ValueError, match="must end in .npz"):
        checkpoint.save_npz(tmp_path / "best.bin", {"w": mx.ones(2)})


def test_a_checkpoint_of_another_metapeft_version_loads(tmp_path, monkeypatch):
    path = tmp_path / "old.safetensors"
    monkeypatch.setattr(metapeft, "__version__", "0.0.1")
    checkpoint.save(path, {"meta": {"w": mx.ones(2)}}, {"step": 1})
    monkeypatch.undo()
    trees, metadata = checkpoint.load(path)
    assert metadata == {"step": 1} and trees["meta"]["w"].tolist() == [1.0, 1.0]
    assert checkpoint.read_metadata(path) == {"step": 1}


def test_a_newer_checkpoint_format_is_refused_by_name(tmp_path, monkeypatch):
    path = tmp_path / "new.safetensors"
    monkeypatch.setattr(checkpoint, "FORMAT", checkpoint.FORMAT_PREFIX + "9")
    checkpoint.save(path, {"meta": {"w": mx.ones(2)}}, {"step": 1})
    monkeypatch.undo()
    for read in (checkpoint.load, checkpoint.read_metadata):
        with pytest.raises(ValueError, match=r"new.safetensors: checkpoint format .*-9.*upgrade"):
            read(path)


def test_a_truncated_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "cut.safetensors"
    checkpoint.save(path, {"meta": {"w": mx.ones(2)}}, {"step": 1})
    path.write_bytes(path.read_bytes()[:20])
    for read in (checkpoint.load, checkpoint.read_metadata):
        with pytest.raises(ValueError, match="cut.safetensors: not a readable"):
            read(path)


def test_foreign_safetensors_names_the_file(tmp_path):
    path = tmp_path / "foreign.safetensors"
    mx.save_safetensors(str(path), {"w": mx.ones(2)})
    with pytest.raises(ValueError, match="foreign.safetensors: not a metapeft checkpoint"):
        checkpoint.load(path)
