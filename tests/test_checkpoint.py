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


def test_other_metapeft_version_names_the_file_and_versions(tmp_path, monkeypatch):
    path = tmp_path / "old.safetensors"
    monkeypatch.setattr(metapeft, "__version__", "0.0.1")
    checkpoint.save(path, {"meta": {"w": mx.ones(2)}}, {"step": 1})
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"old.safetensors: written by metapeft 0.0.1"):
        checkpoint.load(path)


def test_foreign_safetensors_names_the_file(tmp_path):
    path = tmp_path / "foreign.safetensors"
    mx.save_safetensors(str(path), {"w": mx.ones(2)})
    with pytest.raises(ValueError, match="foreign.safetensors: not a metapeft checkpoint"):
        checkpoint.load(path)
