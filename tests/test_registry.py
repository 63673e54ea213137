"""The local registry index: versions, records, atomic writes and bad input."""

from __future__ import annotations

import json
import threading

import mlx.core as mx
import pytest

from metapeft import checkpoint
from metapeft.config import MetaLearningConfig
from metapeft.registry import LocalRegistry, MlflowRegistry, open_registry


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, {"meta": {"w": mx.ones(2)}}, {"algorithm": "reptile", "step": 3})
    return path


def test_versions_count_per_name(tmp_path, ckpt):
    registry = LocalRegistry(tmp_path / "index.json")
    a1 = registry.register("a", ckpt, metadata={"lr": 0.1}, tags={"k": 1})
    b1 = registry.register("b", ckpt)
    a2 = registry.register("a", ckpt)
    assert (a1.version, b1.version, a2.version) == (1, 1, 2)
    assert a1.tags == {"k": "1"} and a1.metadata["lr"] == 0.1 and a1.metadata["step"] == 3
    assert [(r.name, r.version) for r in registry.list()] == [("a", 1), ("a", 2), ("b", 1)]
    assert registry.get("a") == a2 and registry.get("a", 1) == a1
    trees, metadata = registry.load("a", 1)
    assert metadata["algorithm"] == "reptile" and trees["meta"]["w"].shape == (2,)
    # the index is plain JSON, and no temporary file is left beside it
    assert json.loads((tmp_path / "index.json").read_text())["format"] == "metapeft-registry-1"
    assert not list(tmp_path.glob(".index.json.*"))


def test_concurrent_registrations_get_distinct_versions(tmp_path, ckpt):
    registry = LocalRegistry(tmp_path / "index.json")
    threads = [threading.Thread(target=registry.register, args=("m", ckpt)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.version for r in registry.list()) == list(range(1, 9))


def test_bad_input_is_named(tmp_path, ckpt):
    registry = LocalRegistry(tmp_path / "index.json")
    with pytest.raises(ValueError, match="must not be empty"):
        registry.register(" ", ckpt)
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        registry.register("m", tmp_path / "nothing.safetensors")
    with pytest.raises(KeyError, match="no model 'm'.*registered: none"):
        registry.get("m")
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="index.json: not a readable registry index"):
        registry.list()
    (tmp_path / "index.json").write_text('{"models": {}}')
    with pytest.raises(ValueError, match="not a metapeft registry index"):
        registry.list()


def test_backend_follows_the_tracking_section(tmp_path):
    local = MetaLearningConfig().tracking
    assert isinstance(open_registry(local, tmp_path / "i.json"), LocalRegistry)
    mlflow_section = MetaLearningConfig.from_dict(
        {"tracking": {"backend": "mlflow", "uri": f"sqlite:///{tmp_path / 'm.db'}"}}
    ).tracking
    assert isinstance(open_registry(mlflow_section), MlflowRegistry)
