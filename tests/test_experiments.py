"""The reproduction scripts run end to end (a few meta-steps) and write their tables."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


@pytest.mark.parametrize(
    "script, args",
    [
        (
            "sinusoid.py",
            ["--steps", "3", "--tune-steps", "2", "--lr-grid", "0.01,0.03", "--seeds", "0,1"]
            + ["--eval-tasks", "5", "--algorithms", "maml,reptile"],
        ),
        (
            "digits.py",
            ["--steps", "2", "--tune-steps", "1", "--lr-grid", "0.1,0.3", "--seeds", "0,1"]
            + ["--episodes", "5", "--algorithms", "fomaml"],
        ),
        (
            "lm_memory.py",
            [
                "--hidden-size",
                "64",
                "--num-layers",
                "2",
                "--intermediate-size",
                "128",
                "--shots",
                "1",
                "--length",
                "8",
            ],
        ),
        (
            "lm_substitution.py",
            [
                "--steps",
                "2",
                "--train-tasks",
                "4",
                "--val-tasks",
                "2",
                "--eval-tasks",
                "3",
                "--meta-batch",
                "2",
            ],
        ),
        ("lm_step_profile.py", ["--shape", "tiny"]),
        ("sinusoid_step_cost.py", ["--tasks", "1,3", "--repeat", "2", "--number", "2"]),
        ("sinusoid_step_profile.py", ["--tasks", "2", "--no-perf"]),
        ("quantized_products.py", ["--sizes", "8x64x32", "--repeat", "1"]),
        ("blas_rates.py", ["--sizes", "16x32x8"]),
        ("two_builds_in_turns.py", [sys.executable, sys.executable, "--rounds", "1"]),
        (
            "real_model_speed.py",
            [
                "--shape",
                "tiny",
                "--repeat",
                "1",
                "--lora-impls",
                "fused,mlx-lm",
                "--meta-impls",
                "fused",
            ],
        ),
    ],
)
def test_experiment_writes_json_and_markdown(tmp_path, script, args):
    out = tmp_path / "result"
    subprocess.run(
        [sys.executable, str(EXPERIMENTS / script), *args, "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["machine"]["mlx"] and record["rows"]
    table = out.with_suffix(".md").read_text()
    assert table.count("\n") >= 3 and "|" in table
    if script == "lm_substitution.py":
        assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")


def test_meta_train_lora_timing_reads_every_step(tmp_path):
    from metapeft.lm.random_model import save_random_model

    save_random_model(tmp_path / "model", "llama", hidden_size=32, num_layers=1)
    out = tmp_path / "result"
    subprocess.run(
        [sys.executable, str(EXPERIMENTS / "meta_train_lora_timing.py"), "--model",
         str(tmp_path / "model"), "--steps", "3", "--out", str(out)],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    record = json.loads(out.with_suffix(".json").read_text())
    assert [r["step"] for r in record["rows"]] == [1, 2, 3]
    assert all(r["seconds"] >= 0 for r in record["rows"])


def test_smollm2_protocol_runs_end_to_end_on_a_tiny_model(tmp_path):
    """The protocol's every stage (meta-training, the multitask adapter, learning rates
    chosen on validation types, test curves, in context, the report) on a random
    one-block Llama with a chat template, in seconds."""
    from metapeft.lm.random_model import save_random_model

    model = tmp_path / "model"
    save_random_model(model, "llama", hidden_size=32, num_layers=1)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}a:{% endif %}"
    )
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "result"
    subprocess.run(
        [sys.executable, str(EXPERIMENTS / "smollm2_protocol.py"), "--model", str(model),
         "--work-dir", str(tmp_path / "work"), "--out", str(out), "--seeds", "0",
         "--algorithms", "fomaml", "--meta-steps", "2", "--lrs", "0.0001", "0.001", "0.01",
         "--test-tasks-per-type", "1"],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["algorithm"] == "fomaml" and record["machine"]["commit"]
    assert "chose fomaml" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")


def test_the_packaged_text_tasks_are_what_make_text_tasks_writes(tmp_path):
    subprocess.run(
        [sys.executable, str(EXPERIMENTS / "make_text_tasks.py"), "--out-dir", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    packaged = EXPERIMENTS.parent / "metapeft" / "configs"
    for split in ("train", "val", "test"):
        name = f"text_tasks_{split}.jsonl"
        assert (tmp_path / name).read_text() == (packaged / name).read_text(), name


def test_bench_quick_pairs_flags_only_what_is_slower_beyond_the_spread(tmp_path):
    def run(name, medians):
        ops = [
            {"label": label, "params": {"impl": impl}, "median_s": m}
            for (label, impl), m in medians.items()
        ]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"operations": ops}))
        return str(path)

    before = {("a", "fused"): 1.0, ("b", "fused"): 1.0, ("a", "torch"): 1.0}
    paths = [
        run("b1", before),
        run("b2", {**before, ("b", "fused"): 1.05}),
        run("a1", {("a", "fused"): 1.5, ("b", "fused"): 1.02, ("a", "torch"): 9.0}),
        run("a2", {("a", "fused"): 1.5, ("b", "fused"): 1.03, ("a", "torch"): 9.0}),
    ]
    out = tmp_path / "pairs"
    subprocess.run(
        [sys.executable, str(EXPERIMENTS / "bench_quick_pairs.py"), *paths, "--out", str(out)],
        check=True,
        timeout=120,
    )
    text = out.with_suffix(".md").read_text()
    assert "2 operations; slower after by more than the spread within a side: 1" in text
    assert "- a (impl=fused): 0.67x" in text and "torch" not in text


LAUNCH = Path(sys.executable).parent / "mlx.launch"


@pytest.mark.integration
@pytest.mark.skipif(not LAUNCH.exists(), reason="no mlx.launch beside python")
def test_ring_allreduce_and_distributed_scaling_write_their_tables(tmp_path):
    ring = tmp_path / "ring"
    subprocess.run(
        [str(LAUNCH), "-n", "2", "--backend", "ring", "--", sys.executable,
         str(EXPERIMENTS / "ring_allreduce.py"), "--repeats", "2", "--out", str(ring)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    fit = json.loads(ring.with_suffix(".json").read_text())["fit"]
    assert fit["bandwidth_GB_per_s"] > 0
    out = tmp_path / "scaling"
    subprocess.run(
        [sys.executable, str(EXPERIMENTS / "distributed_scaling.py"), "--problems", "sinusoid",
         "--warmup", "1", "--repeats", "1", "--ring", str(ring.with_suffix(".json")),
         "--out", str(out)],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert row["problem"] == "sinusoid" and set(row["measured"]) == {"1", "2", "3"}
    assert row["allreduce_bytes"] == 4 * (40 + 40 + 40 * 40 + 40 + 40 + 1)
    assert "loopback ring (measured here), 8 hosts" in row["projected"]


@pytest.mark.integration
def test_serve_throughput_measures_the_three_modes(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from serve_helpers import save_model

    model = save_model(tmp_path / "model")
    out = tmp_path / "serve"
    subprocess.run(
        [sys.executable, str(EXPERIMENTS / "serve_throughput.py"), "--model", str(model),
         "--tokens", "4", "--rounds", "1", "--max-model-len", "256", "--out", str(out)],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["mixed adapters", "one adapter", "adapter by adapter"]
    assert all(r["tokens_per_s"] > 0 and r["ttft_p99_s"] >= r["ttft_p50_s"] for r in rows)
