"""BenchmarkRunner, the suite's reports and ``metapeft bench``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from metapeft import BenchmarkRunner, machine, reference
from metapeft.bench import peers, problems, real_model, report, suite
from metapeft.bench.runner import prepare_process
from metapeft.cli import app

PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------- runner
def test_time_operation_records_time_memory_and_machine():
    runner = BenchmarkRunner("unit")
    for _ in range(3):
        with runner.time_operation("alloc", n=1 << 20):
            mx.eval(mx.ones(1 << 20) * 2)
    (op,) = runner.operations
    assert op.label == "alloc" and op.params == {"n": 1 << 20}
    assert len(op.seconds) == 3 and all(s > 0 for s in op.seconds)
    assert op.peak_memory_bytes >= 4 * (1 << 20)
    assert runner.machine["chip"] == machine.chip()
    assert runner.operation("alloc", n=1 << 20) is op
    assert runner.operation("alloc", n=1) is None


def test_measure_repeats_and_warms_up():
    calls = []
    runner = BenchmarkRunner("unit")
    op = runner.measure("count", lambda: calls.append(1) or mx.ones(2), repeat=4, warmup=2)
    assert len(calls) == 6 and len(op.seconds) == 4
    with pytest.raises(ValueError, match="repeat and number"):
        runner.measure("count", lambda: None, repeat=0)


def test_measure_interleaved_takes_turns():
    calls = []

    def fn(name):
        return lambda: calls.append(name) or mx.ones(2)

    runner = BenchmarkRunner("unit")
    ops = runner.measure_interleaved(
        "turns", {"a": fn("a"), "b": fn("b")}, repeat=3, warmup=1, number=2, n=8
    )
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3
    assert [(o.params, len(o.seconds)) for o in ops] == [
        ({"n": 8, "impl": "a"}, 3),
        ({"n": 8, "impl": "b"}, 3),
    ]
    with pytest.raises(ValueError, match="repeat and number"):
        runner.measure_interleaved("turns", {"a": fn("a")}, number=0)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_prepare_process_keeps_freed_memory_and_names_its_conditions():
    conditions = prepare_process()
    assert conditions["malloc"] == "freed memory kept"
    assert conditions["OPENBLAS_THREAD_TIMEOUT"] == os.environ["OPENBLAS_THREAD_TIMEOUT"]
    assert conditions["GOMP_SPINCOUNT"] == os.environ["GOMP_SPINCOUNT"]
    assert conditions["peers"] == (
        ", ".join(f"{k} {v}" for k, v in peers.installed().items()) or "none installed"
    )
    data = {**_data(), "conditions": conditions}
    assert "conditions: malloc freed memory kept, OPENBLAS_THREAD_TIMEOUT" in report.stamp(data)


def test_summary_save_and_plot(tmp_path):
    runner = BenchmarkRunner("unit")
    runner.conditions = {"malloc": "system default"}
    runner.measure("a", lambda: mx.ones(8) + 1, repeat=2, impl="fused")
    runner.measure("a", lambda: mx.ones(8) + 1, repeat=2, impl="reference")
    table = runner.summary()
    assert "impl=fused" in table and "impl=reference" in table
    data = json.loads(runner.save(tmp_path / "r.json").read_text())
    assert data["name"] == "unit" and data["machine"]["mlx"] == mx.__version__
    assert data["conditions"] == {"malloc": "system default"}
    assert [o["params"]["impl"] for o in data["operations"]] == ["fused", "reference"]
    assert all(o["samples"] == 2 and o["median_s"] > 0 for o in data["operations"])
    assert runner.plot(tmp_path / "r.png").read_bytes().startswith(PNG)
    with pytest.raises(ValueError, match="nothing to plot"):
        BenchmarkRunner("empty").plot(tmp_path / "e.png")


# ----------------------------------------------------------------------- peers
def test_peers_are_timed_in_turns_beside_the_fused_paths_when_installed(monkeypatch):
    def impls(installed):
        monkeypatch.setattr(peers, "installed", lambda: installed)
        found = {}
        for c in suite.cases(suite.TINY):
            if c.interleave:
                found.setdefault(c.label.split()[0], set()).add(c.params["impl"])
        return found

    none = impls({})
    assert not any(i.split()[0] in peers.LIBRARIES for group in none.values() for i in group)
    both = impls({"torch": "2.13.0", "jax": "0.10.2"})
    assert {"torch", "torch compiled", "jax"} <= both["lora_linear"]
    assert all({"torch", "jax"} <= both[op] for op in ("linear", "task_sgd", "reptile_update"))
    assert "torch" not in impls({"jax": "0.10.2"})["linear"]


INSTALLED = peers.installed()
PEER_IMPLS = [
    pytest.param("torch", marks=pytest.mark.skipif("torch" not in INSTALLED, reason="")),
    pytest.param(
        "torch compiled",
        marks=[pytest.mark.slow, pytest.mark.skipif("torch" not in INSTALLED, reason="")],
    ),
    pytest.param("jax", marks=pytest.mark.skipif("jax" not in INSTALLED, reason="")),
]


@pytest.mark.parametrize("impl", PEER_IMPLS)
def test_peer_twins_compute_the_same_maths(impl):
    close = dict(rtol=1e-5, atol=1e-6)
    compiled = impl == "torch compiled"  # only the lora_linear twin is compiled
    if not compiled:
        x, w = problems.linear_problem(6, 5)
        got = np.asarray(peers.linear(impl, x, w)())
        np.testing.assert_allclose(got, reference.linear(x, w), **close)
    p = problems.lora_problem(2, 3, 8, 2)
    value, grads = peers.lora_forward_backward(impl, p)()
    expected = problems.lora_forward_backward("reference", p)()
    np.testing.assert_allclose(_numpy(value), expected[0].item(), **close)
    for got, want in zip(grads, expected[1], strict=True):
        np.testing.assert_allclose(_numpy(got), want, **close)
    if compiled:
        return
    p = problems.update_problem(3, "sinusoid")
    sgd = reference.task_sgd(p["params"], p["grads"], 0.01)
    reptile = reference.reptile_update(p["meta"], p["params"], 0.1)
    for step, want in ((peers.task_sgd(impl, p), sgd), (peers.reptile_update(impl, p), reptile)):
        got = step()
        got = got.values() if isinstance(got, dict) else got
        for a, b in zip(got, want.values(), strict=True):
            np.testing.assert_allclose(_numpy(a), b, **close)


def _numpy(a):
    return a.detach().numpy() if hasattr(a, "detach") else np.asarray(a)


# ---------------------------------------------------------------------- report
def _op(label, median, peak=0, **params):
    return {"label": label, "params": params, "median_s": median, "peak_memory_bytes": peak}


def _data(*ops):
    stamp = {"chip": "X1", "cores": 2, "os": "Linux", "arch": "x86_64", "mlx": "0.32.4"}
    return {"name": "t", "started": "2026-01-01T00:00:00", "machine": stamp, "operations": ops}


def test_comparisons_and_sweeps_are_found_from_parameters():
    data = _data(
        _op("op", 1.0, impl="fused"),
        _op("op", 3.0, impl="reference"),
        _op("alone", 1.0, impl="naive"),
        *(_op("step", 0.1 * t, 1000 + 100 * t, impl="fused", tasks=t) for t in (1, 2, 4, 8)),
    )
    (comp,) = report.comparisons(data)
    assert comp.label == "op" and set(comp.ops) == {"fused", "reference"}
    (sweep,) = report.sweeps(data)
    assert sweep.key == "tasks" and [v for v, _ in sweep.points] == [1, 2, 4, 8]
    assert sweep.params == {"impl": "fused"}
    text = report.markdown(data)
    assert "| op | reference | 3.00 s | 3.00x |" in text
    assert "Cost per task is lowest" in text


def test_memory_fit_recovers_a_line_and_the_largest_tasks():
    data = _data(*(_op("s", 1.0, 5000 + 300 * t, impl="fused", tasks=t) for t in (1, 2, 4)))
    fit = report.memory_fit(report.sweeps(data)[0], budget=8100)
    assert fit.intercept == pytest.approx(5000) and fit.per_task == pytest.approx(300)
    assert fit.r2 == pytest.approx(1.0) and fit.max_tasks == 10


def test_linearity_names_fixed_cost_and_growth():
    ops = [_op("s", s, impl="fused", tasks=t) for t, s in ((1, 1.0), (4, 1.2), (16, 4.8), (64, 40))]
    text = report.linearity(report.sweeps(_data(*ops))[0])
    assert "lowest at tasks=4" in text and "fixed cost" in text and "not linear" in text


def test_the_rank_sentence_is_computed_from_the_sweep():
    ops = [_op("s", c, impl="fused", rank=r) for r, c in ((2, 1.0), (4, 1.1), (8, 1.3))]
    text = report.linearity(report.sweeps(_data(*ops))[0])
    assert "4x the rank) a meta-step costs 1.30x as much" in text
    assert "90% of the step at rank=2 and 69% at rank=8" in text
    steep = [_op("s", c, impl="fused", rank=r) for r, c in ((2, 1.0), (4, 2.0), (8, 4.0))]
    assert "0% of the step at rank=2" in report.linearity(report.sweeps(_data(*steep))[0])


def test_compare_matches_operations_and_rejects_disjoint_runs():
    a = _data(_op("op", 2.0, impl="fused"), _op("only a", 1.0, impl="fused"))
    b = _data(_op("op", 1.0, impl="fused"))
    text = report.compare(a, b, names=("m1", "m3"))
    assert "| op | impl=fused | 2.00 s | 1.00 s | 2.00x |" in text and "only a" not in text
    with pytest.raises(ValueError, match="no operation in common"):
        report.compare(a, _data(_op("other", 1.0, impl="fused")))


def test_load_rejects_files_that_are_not_results(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        report.load(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="operations"):
        report.load(bad)


def test_index_keeps_hand_written_text_and_lists_newest_runs(tmp_path):
    (tmp_path / "README.md").write_text("# Results\n\nhand-written notes\n")
    for name, day, median in (
        ("m1", "2026-01-01", 2.0),
        ("m1", "2026-02-01", 1.5),
        ("m1", "2026-02-01-2", 5.0),
        ("m1", "2026-02-01-10", 1.0),
        ("m2", "2026-01-05", 3.0),
    ):
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        data = _data(_op("op", median, impl="fused"), _op("op", 4.0, impl="reference"))
        (folder / f"{day}.json").write_text(json.dumps(data))
    report.update_index(tmp_path)
    report.update_index(tmp_path)  # idempotent
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("# Results\n\nhand-written notes\n")
    assert text.count(report.INDEX_START) == 1
    assert "m1/2026-02-01-10.md" in text and "m1/2026-02-01-2.md" not in text
    assert "reference 4.00x" in text and "reference 1.33x" in text


# ------------------------------------------------------------------------- CLI
cli = CliRunner()


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setenv("METAPEFT_BENCH_SIZE", "tiny")


def test_bench_quick_writes_json_markdown_and_plots_that_agree(tmp_path, tiny):
    result = cli.invoke(app, ["bench", "--quick", "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    folder = tmp_path / machine.machine_id()
    (js,) = folder.glob("*.json")
    data = report.load(js)
    expected = {(c.label, json.dumps(c.params, sort_keys=True)) for c in suite.cases(suite.TINY)}
    recorded = {(o["label"], json.dumps(o["params"], sort_keys=True)) for o in data["operations"]}
    assert recorded == expected and data["quick"] is True
    md = js.with_suffix(".md").read_text()
    for c in report.comparisons(data):
        fused = c.ops["fused"]["median_s"]
        assert f"| {c.title} | fused | {report.format_seconds(fused)} | - |" in md
    pngs = sorted(folder.glob("*.png"))
    assert (
        len(pngs)
        == len(report.sweeps(data)) + sum(s.key == "tasks" for s in report.sweeps(data)) + 1
    )
    assert all(p.read_bytes().startswith(PNG) and f"({p.name})" in md for p in pngs)
    assert js.stem in (tmp_path / "README.md").read_text()
    # A second run the same day never overwrites the first.
    assert (
        cli.invoke(app, ["bench", "--quick", "--no-plots", "--output-dir", str(tmp_path)]).exit_code
        == 0
    )
    assert len(list(folder.glob("*.json"))) == 2


def test_bench_compare_and_report_commands(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_data(_op("op", 2.0, impl="fused"))))
    b.write_text(json.dumps(_data(_op("op", 0.5, impl="fused"))))
    result = cli.invoke(app, ["bench", "compare", str(a), str(b)])
    assert result.exit_code == 0, result.output
    assert "4.00x" in result.output
    out = tmp_path / "r.md"
    assert cli.invoke(app, ["bench", "report", str(a), "--out", str(out)]).exit_code == 0
    assert "Machine: X1" in out.read_text()
    bad = cli.invoke(app, ["bench", "compare", str(a), str(tmp_path / "missing.json")])
    assert bad.exit_code == 1 and "missing.json" in bad.output


def test_bench_unwritable_output_dir_is_a_clear_error(tmp_path, tiny):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = cli.invoke(app, ["bench", "--quick", "--output-dir", str(blocker)])
    assert result.exit_code == 1 and "cannot write" in result.output


def test_python_m_metapeft_bench_help():
    result = subprocess.run(
        [sys.executable, "-m", "metapeft.bench", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "120"},
    )
    assert result.returncode == 0 and "compare" in result.stdout


def test_a_failing_benchmark_is_reported_never_skipped(tmp_path, monkeypatch):
    def broken():
        raise RuntimeError("kernel exploded")

    def cases(_sizes):
        yield suite.Case("ok", {"impl": "fused"}, lambda: lambda: mx.ones(2), repeat=1)
        yield suite.Case("bad", {"impl": "fused"}, broken, repeat=1)
        for impl, build in (("fused", lambda: lambda: mx.ones(2)), ("reference", broken)):
            yield suite.Case("turns", {"impl": impl}, build, repeat=1, interleave=True)

    monkeypatch.setattr(suite, "cases", cases)
    result = cli.invoke(app, ["bench", "--quick", "--no-plots", "--output-dir", str(tmp_path)])
    assert result.exit_code == 1 and "3 benchmark(s) failed" in result.output
    assert "kernel exploded" in result.output
    (js,) = (tmp_path / machine.machine_id()).glob("*.json")
    data = report.load(js)
    assert [o["label"] for o in data["operations"]] == ["ok"]
    assert [(f["label"], f["params"]["impl"]) for f in data["failures"]] == [
        ("bad", "fused"),
        ("turns", "fused"),
        ("turns", "reference"),
    ]
    assert "## Failed" in js.with_suffix(".md").read_text()


def test_rank_sweep_reports_growth_over_the_range():
    ops = [_op("s", s, impl="fused", rank=r) for r, s in ((1, 1.0), (8, 1.2), (64, 2.0))]
    text = report.markdown(_data(*ops))
    assert "From rank=1 to rank=64 (64x the rank) a meta-step costs 2.00x" in text
    assert "| 64 | 2.00 s | 0.50 | 2.00x |" in text


def test_report_redraws_plots_beside_the_result(tmp_path):
    ops = [_op("s", 0.1 * t, 1000 * t, impl="fused", tasks=t) for t in (1, 2, 4)]
    result = tmp_path / "run.json"
    result.write_text(json.dumps(_data(*ops)))
    out = tmp_path / "run.md"
    assert (
        cli.invoke(app, ["bench", "report", str(result), "--plots", "--out", str(out)]).exit_code
        == 0
    )
    pngs = sorted(tmp_path.glob("run-*.png"))
    assert len(pngs) == 2 and all(f"({p.name})" in out.read_text() for p in pngs)


# ------------------------------------------------------------------ real-model shapes


@pytest.mark.parametrize("impl", ["fused", "mlx-lm", "torch"])
def test_real_model_lora_step_gives_the_loss_of_a_random_model(impl):
    if impl == "torch" and "torch" not in peers.installed():
        pytest.skip("torch is not installed")
    out = real_model.lora_step("tiny", impl)()
    loss = float(out) if impl == "torch" else out[0].item()
    # random weights: close to the loss of uniform predictions over the vocabulary
    assert abs(loss - math.log(real_model.SHAPES["tiny"]["vocab_size"])) < 1.0


@pytest.mark.parametrize("impl", ["fused", "torch"])
def test_real_model_meta_step_gives_the_query_loss_of_a_random_model(impl):
    if impl == "torch" and "torch" not in peers.installed():
        pytest.skip("torch is not installed")
    out = real_model.meta_step("tiny", impl)()
    query_loss = out["query_loss"] if impl == "fused" else out
    assert abs(query_loss - math.log(real_model.SHAPES["tiny"]["vocab_size"])) < 1.0


def test_real_model_step_gflop_matches_the_known_count():
    # One SmolLM2-135M LoRA step over 4 x 64 tokens is about 140 GFLOP of products.
    assert 130 < real_model.step_gflop("smollm2-135m", 4, 64) < 145


def test_real_model_step_products_take_each_weight_twice_and_each_adapter_three_times():
    # Frozen weights: forward, and the input gradient; adapters: forward, and the
    # gradients of their input and of themselves; attention: two products of every
    # query head with the keys or values of its sequence, forward, and four backward.
    # Counted on the model itself.
    model = real_model.mlx_model("tiny")
    flat = tree_flatten(model.parameters())
    frozen = sum(v.size for k, v in flat if k.endswith(("proj.weight", "embed_tokens.weight")))
    adapted = ("q_proj.weight", "v_proj.weight")
    adapters = sum(real_model.RANK * sum(v.shape) for k, v in flat if k.endswith(adapted))
    sequences, length = 3, 10
    tokens = sequences * length
    query_dims = model.layers[0].self_attn.q_proj.weight.shape[0]  # heads x head_dim
    per_layer = 6 * 2 * tokens * length * query_dims
    flops = 2 * tokens * (2 * frozen + 3 * adapters) + len(model.layers) * per_layer
    products = real_model.step_products("tiny", sequences, length)
    assert sum(p.flop for p in products) == flops
    stored = {}  # a weight is one array however a product takes it
    for p in products:
        if p.weight is not None:
            shape = (p.k, p.n) if p.transposed else (p.n, p.k)
            assert stored.setdefault(p.weight, shape) == shape, p
    assert real_model.step_gflop("tiny", sequences, length) * 1e9 == pytest.approx(flops)


@pytest.mark.skipif("jax" not in peers.installed(), reason="jax is not installed")
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_jax_sinusoid_maml_twin_computes_metapefts_query_losses(inner_steps):
    episodes = problems.sinusoid_episodes(5)
    data = (episodes.support_x, episodes.support_y, episodes.query_x, episodes.query_y)
    twin = peers.sinusoid_maml("jax", problems.sinusoid_net(), data, inner_steps)
    learner = problems.make_learner(
        "maml", problems.sinusoid_net(), inner_steps=inner_steps, batched=True
    )
    for _ in range(3):  # the same outer (Adam) steps too
        ours = learner.meta_train_step(episodes, problems.mse)["query_loss"]
        assert float(twin()) == pytest.approx(ours, rel=1e-4)
