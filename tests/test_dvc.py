"""The DVC pipeline of examples/dvc: meta-train -> evaluate, plot, export, rerunning only
what a changed parameter feeds."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("dvc", reason="DVC is the optional 'dvc' extra (pip install metapeft[dvc])")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "dvc"
BIN = Path(sys.executable).parent


def run(*command: str, cwd: Path) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command}: {done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.integration
def test_dvc_repro_runs_the_pipeline_and_reruns_only_what_changed(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("DVC needs git, which is not installed")
    for name in ("dvc.yaml", "config.yaml", "params.yaml"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    config = (tmp_path / "config.yaml").read_text()
    (tmp_path / "config.yaml").write_text(
        config.replace("num_iterations: 300", "num_iterations: 20")
    )
    run("git", "init", "-q", cwd=tmp_path)
    run("git", "config", "user.email", "ci@example.com", cwd=tmp_path)
    run("git", "config", "user.name", "ci", cwd=tmp_path)
    dvc = str(BIN / "dvc")
    run(dvc, "init", "-q", cwd=tmp_path)

    first = run(dvc, "repro", cwd=tmp_path)
    for stage in ("meta-train", "evaluate", "plot", "export"):
        assert f"Running stage '{stage}'" in first
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 10 and metrics["tasks"] == 200
    assert metrics["query_loss"] > 0 and metrics["query_loss_ci95"] > 0
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 0
    assert (tmp_path / "exported" / "meta.npz").stat().st_size > 0
    run("git", "add", "-A", cwd=tmp_path)
    run("git", "commit", "-qm", "first run", cwd=tmp_path)

    params = (tmp_path / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(params.replace("steps: 10", "steps: 3"))
    second = run(dvc, "repro", cwd=tmp_path)
    assert "Running stage 'evaluate'" in second
    for stage in ("meta-train", "plot", "export"):
        assert f"Stage '{stage}' didn't change, skipping" in second
    diff = json.loads(run(dvc, "metrics", "diff", "--json", cwd=tmp_path))
    change = diff["metrics.json"]["steps"]
    assert (change["old"], change["new"]) == (10, 3)
