"""Meta-training on several ranks: task shards, the single-process path, and real runs
of ``mlx.launch`` (ring backend, localhost) against single-process runs, with ranks
killed, stopped and interrupted, and bad input. Every process has a hard timeout."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from metapeft import checkpoint, distributed, training
from metapeft.cli import app
from metapeft.config import MetaLearningConfig
from metapeft.config.loading import packaged_config
from metapeft.tasks import Episodes

BIN = Path(sys.executable).parent
LAUNCH, METAPEFT = BIN / "mlx.launch", BIN / "metapeft"
SINUSOID = ["--config", str(packaged_config("sinusoid_maml")), "--meta-batch-size", "6"]
LORA = ["--config", str(packaged_config("lora_sinusoid")), "--meta-batch-size", "6"]
runner = CliRunner()

needs_launcher = pytest.mark.skipif(not LAUNCH.exists(), reason="no mlx.launch beside python")
needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")


def launched(test):
    """A test of real ``mlx.launch`` runs: marked integration, skipped without it."""
    return pytest.mark.integration(needs_launcher(test))


# ---------------------------------------------------------------- tasks per rank


def group(rank: int, size: int) -> SimpleNamespace:
    return SimpleNamespace(rank=lambda: rank, size=lambda: size)


def episodes(tasks: int) -> Episodes:
    x = mx.arange(tasks * 2, dtype=mx.float32).reshape(tasks, 2, 1)
    return Episodes(x, x, x, x)


def test_each_rank_takes_consecutive_tasks_and_together_all_of_them():
    for tasks, size in [(12, 3), (100, 3), (2, 3), (5, 1)]:
        ranges = [distributed.task_range(tasks, group(r, size)) for r in range(size)]
        covered = [t for start, stop in ranges for t in range(start, stop)]
        assert covered == list(range(tasks))
        assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1
    share = distributed.shard(episodes(6), group(1, 3))
    assert share.num_tasks == 2
    assert share.support_x[:, 0, 0].tolist() == [4.0, 6.0]  # tasks 2 and 3


def test_a_meta_batch_that_does_not_split_over_the_ranks_is_refused():
    with pytest.raises(ValueError, match=r"meta_batch_size \(T=25\).*world size \(N=2\)"):
        distributed.shard(episodes(25), group(0, 2))


def test_the_ring_launchers_hostfile_tells_how_many_ranks_share_a_host(tmp_path, monkeypatch):
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([["10.0.0.1:5000"], ["10.0.0.1:5001"], ["10.0.0.2:5002"]]))
    monkeypatch.setenv("MLX_HOSTFILE", str(hostfile))
    monkeypatch.setenv("MLX_RANK", "1")
    assert distributed.ranks_on_this_host() == 2
    monkeypatch.setenv("MLX_RANK", "2")
    assert distributed.ranks_on_this_host() == 1
    monkeypatch.delenv("MLX_HOSTFILE")
    assert distributed.ranks_on_this_host() == 1


# --------------------------------------------------------------- one process


def test_one_process_is_a_world_of_one_that_calls_no_collective(tmp_path, monkeypatch):
    world = distributed.world(5.0)
    assert (world.size, world.rank, world.backend) == (1, 0, "none")

    def collective(*args, **kwargs):
        raise AssertionError("a collective was called by a single process")

    for name in ("all_gather", "all_max", "all_min", "all_sum", "recv", "send", "sum_scatter"):
        monkeypatch.setattr(mx.distributed, name, collective)
    config = MetaLearningConfig.default(
        overrides={
            "training": {"num_iterations": 3, "eval_every": 2, "checkpoint_every": 2},
            "output": {"output_dir": str(tmp_path / "run")},
        },
        environ={},
    )
    summary = training.train(config)
    assert summary["steps"] == 3
    with world.deadline("nothing"):
        assert world.any(True, "nothing") and not world.any(False, "nothing")
    world.agree({"config": "anything"})


REPORTING = """
import os, signal, sys, time
from types import SimpleNamespace
from metapeft.distributed import DistributedError, World

world = World(SimpleNamespace(rank=lambda: 0, size=lambda: 2), "ring", timeout=1.0)
try:
    with world.reporting_termination():
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher's, during training
        time.sleep(5)
except DistributedError as e:
    print("raised:", e, flush=True)
try:
    with world.reporting_termination():
        raise ValueError("this rank's own error")
except ValueError as e:
    os.kill(os.getpid(), signal.SIGTERM)  # the launcher's, while the rank reports
    time.sleep(0.2)
    print("reported:", e, flush=True)
time.sleep(60)  # a rank that hangs after its report
"""


def test_sigterm_names_the_lost_rank_and_does_not_cut_short_a_report():
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", REPORTING], capture_output=True, text=True, timeout=120
    )
    assert result.stdout.splitlines() == [
        "raised: stopped by SIGTERM; lost rank 1",
        "reported: this rank's own error",
    ], result.stderr
    assert "error: rank 0/2: stopped by SIGTERM while it reported an error" in result.stderr
    assert result.returncode == 1
    assert time.monotonic() - start < 30  # its timeout, not the 60 s hang


# ------------------------------------------------------------ real launches


def free_ports(count: int) -> int:
    """A first port of ``count`` consecutive free ones on localhost (the ring's)."""
    for _ in range(100):
        base = random.randrange(20000, 60000)
        sockets = [socket.socket() for _ in range(count)]
        try:
            for i, s in enumerate(sockets):
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free ports")


class Launch:
    """``mlx.launch -n N -- COMMAND`` as a real process group, killed whole if a test
    leaves it running."""

    def __init__(self, ranks: int, *command: str, env: dict[str, str] | None = None) -> None:
        self.ranks = ranks
        self.proc = subprocess.Popen(
            [str(LAUNCH), "-n", str(ranks), "--starting-port", str(free_ports(ranks)), "--"]
            + [str(c) for c in command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.stdout = self.stderr = ""

    def __enter__(self) -> Launch:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.communicate()

    def finish(self, timeout: float) -> Launch:
        """Waits for the launcher (all its ranks) to end."""
        self.stdout, self.stderr = self.proc.communicate(timeout=timeout)
        return self

    def exit_codes(self) -> dict[int, int]:
        """The ranks that failed and their status, as the launcher reports them."""
        found = re.findall(r"Node with rank (\d+) exited with code (-?\d+)", self.stderr)
        return {int(rank): int(code) for rank, code in found}

    def pids(self) -> dict[int, int]:
        """Each rank's process id: the launcher's children, by their MLX_RANK."""
        pids = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
                environ = (entry / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError):
                continue
            if parent == self.proc.pid:
                for variable in environ:
                    if variable.startswith(b"MLX_RANK="):
                        pids[int(variable[len(b"MLX_RANK=") :])] = int(entry.name)
        assert len(pids) == self.ranks, pids
        return pids


def run(*args) -> None:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def launch(ranks: int, *args, timeout: float = 120, env=None) -> Launch:
    with Launch(ranks, METAPEFT, *args, env=env) as launched:
        return launched.finish(timeout)


def wait_for_steps(run_dir: Path, steps: int, launched: Launch) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert launched.proc.poll() is None, launched.finish(10).stderr
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.01)


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def meta(run_dir: Path) -> dict[str, np.ndarray]:
    trees, _ = checkpoint.load(run_dir / "checkpoints" / "last.safetensors")
    return {k: np.array(v) for k, v in tree_flatten(trees["meta"])}


def assert_same_run(a: Path, b: Path) -> None:
    """The same final meta-parameters and per-step losses, up to summation order."""
    pa, pb = meta(a), meta(b)
    assert pa.keys() == pb.keys()
    for key in pa:
        np.testing.assert_allclose(pa[key], pb[key], rtol=1e-5, atol=1e-6, err_msg=key)
    lines = [
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for run in (a, b)
    ]
    assert [m["step"] for m in lines[0]] == [m["step"] for m in lines[1]]
    for ma, mb in zip(*lines, strict=True):
        for key in ("query_loss", "support_loss", "param_diff", "val_query_loss"):
            if key in ma or key in mb:
                np.testing.assert_allclose(ma[key], mb[key], rtol=1e-4, err_msg=key)


def assert_written_by_rank_0_alone(run_dir: Path, ranks: int, steps: int) -> None:
    logs = list(run_dir.glob("train-*.log"))
    assert len(logs) == 1, logs
    assert f"world: {ranks} ranks (ring)" in logs[0].read_text()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, steps + 1))


@launched
@pytest.mark.parametrize("config", [SINUSOID, LORA], ids=["maml-second-order", "lora-reptile"])
def test_two_ranks_reach_the_parameters_of_one_process(config, tmp_path):
    args = [*config, "--num-iterations", "4", "--eval-every", "2", "--checkpoint-every", "4"]
    run("train", *args, "--output-dir", tmp_path / "one")
    launched = launch(2, "train", *args, "--output-dir", tmp_path / "two")
    assert launched.exit_codes() == {}, launched.stderr
    assert launched.stdout.count("summary") == 1  # rank 0 reports for all
    assert_same_run(tmp_path / "one", tmp_path / "two")
    assert_written_by_rank_0_alone(tmp_path / "two", 2, 4)


@launched
def test_three_ranks_reach_the_parameters_of_one_process(tmp_path):
    """Six tasks on three ranks; the 100 validation tasks split 33, 33, 34."""
    args = [*SINUSOID, "--num-iterations", "3", "--eval-every", "3", "--checkpoint-every", "3"]
    run("train", *args, "--output-dir", tmp_path / "one")
    launched = launch(3, "train", *args, "--output-dir", tmp_path / "three")
    assert launched.exit_codes() == {}, launched.stderr
    assert_same_run(tmp_path / "one", tmp_path / "three")
    assert_written_by_rank_0_alone(tmp_path / "three", 3, 3)


@launched
def test_meta_train_lora_on_two_ranks_writes_the_adapters_of_one_process(tmp_path):
    """The language-model path, its tasks adapted one at a time (the step not compiled)."""
    pytest.importorskip("mlx_lm")
    from lm_helpers import substitution_tasks

    from metapeft.lm.random_model import save_random_model

    model = tmp_path / "tiny-llama"
    save_random_model(model, "llama", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
    tasks = substitution_tasks(tmp_path / "tasks.jsonl")
    args = ["meta-train-lora", "--model", model, "--tasks", tasks, "--algorithm", "fomaml"]
    args += ["--rank", "4", "--steps", "3", "--meta-batch-size", "4", "--support-size", "2"]
    args += ["--query-size", "2", "--inner-steps", "1", "--task-loop"]
    run(*args, "--output-dir", tmp_path / "one")
    launched = launch(2, *args, "--output-dir", tmp_path / "two")
    assert launched.exit_codes() == {}, launched.stderr
    assert_same_run(tmp_path / "one", tmp_path / "two")
    one = mx.load(str(tmp_path / "one" / "adapters.safetensors"))
    two = mx.load(str(tmp_path / "two" / "adapters.safetensors"))
    assert one.keys() == two.keys()
    for key in one:
        np.testing.assert_allclose(np.array(one[key]), np.array(two[key]), rtol=1e-5, atol=1e-6)


@launched
@needs_proc
def test_a_killed_rank_stops_the_other_and_the_run_resumes(tmp_path):
    args = [*SINUSOID, "--num-iterations", "60", "--checkpoint-every", "1", "--eval-every", "60"]
    run("train", *args, "--output-dir", tmp_path / "straight")
    killed = tmp_path / "killed"
    with Launch(2, METAPEFT, "train", *args, "--output-dir", killed) as launched:
        # a step's metrics line comes before its checkpoint: with 4 lines, `last` is >= 3
        wait_for_steps(killed, 4, launched)
        pids = launched.pids()
        os.kill(pids[1], signal.SIGKILL)
        start = time.monotonic()
        launched.finish(timeout=60)
    assert time.monotonic() - start < 60
    assert launched.exit_codes()[0] != 0, launched.stderr
    assert re.search(r"error: rank 0/2: .*lost rank 1 \(pid \d+, exited\)", launched.stderr)
    step = checkpoint.read_metadata(killed / "checkpoints" / "last.safetensors")["step"]
    assert 3 <= step < 60
    meta(killed)  # checkpoints/last loads: its checksum holds
    resumed = launch(2, "train", *args, "--output-dir", killed, "--resume")
    assert resumed.exit_codes() == {}, resumed.stderr
    assert_same_run(tmp_path / "straight", killed)


@launched
@needs_proc
@pytest.mark.parametrize("ranks", [2, 3])
def test_a_stopped_rank_makes_the_others_give_up_within_the_timeout(ranks, tmp_path):
    """A rank that hangs (SIGSTOP): the others wait ``rank_timeout`` seconds (5 here)
    in the meta-step's collectives, then exit naming it."""
    out = tmp_path / "run"
    args = [*SINUSOID, "--num-iterations", "100000", "--checkpoint-every", "2"]
    env = {"METAPEFT_TRAINING__RANK_TIMEOUT": "5"}
    with Launch(ranks, METAPEFT, "train", *args, "--output-dir", out, env=env) as launched:
        wait_for_steps(out, 3, launched)
        pids = launched.pids()
        stopped = ranks - 1
        os.kill(pids[stopped], signal.SIGSTOP)
        start = time.monotonic()
        others = [pid for rank, pid in pids.items() if rank != stopped]
        while not all(gone(pid) for pid in others):
            assert time.monotonic() - start < 60, "the other ranks still run after 60 s"
            time.sleep(0.1)
        elapsed = time.monotonic() - start
        os.kill(pids[stopped], signal.SIGKILL)  # the launcher waits for it
        launched.finish(timeout=30)
    assert elapsed < 60
    codes = launched.exit_codes()
    assert all(codes[rank] != 0 for rank in range(ranks)), launched.stderr
    assert re.search(
        rf"did not finish within 5 s; lost rank {stopped} \(pid {pids[stopped]}, stopped\)",
        launched.stderr,
    ), launched.stderr
    meta(out)  # checkpoints/last is intact


@launched
@needs_proc
def test_ctrl_c_stops_every_rank_after_the_same_step_and_resumes_on_one_process(tmp_path):
    args = [*SINUSOID, "--num-iterations", "60", "--checkpoint-every", "100"]
    args += ["--eval-every", "100"]
    run("train", *args, "--output-dir", tmp_path / "straight")
    out = tmp_path / "interrupted"
    with Launch(2, METAPEFT, "train", *args, "--output-dir", out) as launched:
        wait_for_steps(out, 3, launched)
        for pid in launched.pids().values():
            os.kill(pid, signal.SIGINT)
        launched.finish(timeout=60)
    # 130, or the launcher's SIGTERM on the way out once rank 1 has exited.
    assert launched.exit_codes()[0] in (130, -15), launched.stderr
    assert "interrupted:" in launched.stdout and "error" not in launched.stderr
    step = checkpoint.read_metadata(out / "checkpoints" / "last.safetensors")["step"]
    assert 3 <= step < 60
    assert len((out / "metrics.jsonl").read_text().splitlines()) == step
    run("train", *args, "--output-dir", out, "--resume")  # another world size: one process
    assert_same_run(tmp_path / "straight", out)


@launched
def test_a_rank_that_never_connects_stops_the_others_within_the_timeout(tmp_path):
    """Rank 1 never starts metapeft; rank 0, waiting for it to connect (inside
    ``mx.distributed.init``, which holds the GIL), exits after ``rank_timeout``."""
    train = f"{METAPEFT} train --num-iterations 2 --meta-batch-size 4 --output-dir {tmp_path}"
    script = f'if [ "$MLX_RANK" = 1 ]; then exec sleep 60; else exec {train}; fi'
    env = {"METAPEFT_TRAINING__RANK_TIMEOUT": "3"}
    start = time.monotonic()
    with Launch(2, "bash", "-c", script, env=env) as launched:
        launched.finish(timeout=60)
    assert time.monotonic() - start < 60
    assert launched.exit_codes()[0] != 0, launched.stderr
    assert "Timeout (0:00:03)!" in launched.stderr, launched.stderr
    assert "in _connect_all_ranks" in launched.stderr


@launched
def test_a_meta_batch_not_divisible_by_the_ranks_is_an_error_on_every_rank(tmp_path):
    out = tmp_path / "run"
    launched = launch(2, "train", "--num-iterations", "2", "--output-dir", out, timeout=60)
    for rank in (0, 1):
        assert (
            f"error: rank {rank}/2: meta_batch_size (T=25) is not divisible by the world size "
            "(N=2)" in launched.stderr
        ), launched.stderr
        assert launched.exit_codes()[rank] != 0  # 1, or the launcher's SIGTERM on the way out
    assert not out.exists()


@launched
def test_ranks_started_with_different_configs_is_an_error_on_every_rank(tmp_path):
    command = f'exec {METAPEFT} train --num-iterations 2 --meta-batch-size 4 --seed "$MLX_RANK"'
    with Launch(2, "bash", "-c", f"{command} --output-dir {tmp_path / 'run'}") as launched:
        launched.finish(timeout=60)
    for rank in (0, 1):
        assert re.search(
            rf"error: rank {rank}/2: the ranks were started with different configs \(rank 0: "
            r"[0-9a-f]{16}; rank 1: [0-9a-f]{16}\)",
            launched.stderr,
        ), launched.stderr
        assert launched.exit_codes()[rank] != 0


@launched
def test_info_shows_the_world_and_ranks_on_one_host_share_its_blas_threads(monkeypatch):
    launched = launch(2, "info", timeout=60)
    assert launched.exit_codes() == {}, launched.stderr
    assert re.search(r"world\s+2 ranks, ring backend", launched.stdout), launched.stdout
    assert launched.stdout.count("world") == 1  # rank 0's table alone
    code = (
        "import ctypes, os, metapeft, scipy_openblas32\n"
        "lib = ctypes.CDLL(os.path.join(scipy_openblas32.get_lib_dir(), 'libscipy_openblas.so'))\n"
        "print('threads', lib.scipy_openblas_get_num_threads(), metapeft._ext.cpu_threads())\n"
    )
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.delenv("METAPEFT_NUM_THREADS", raising=False)
    with Launch(2, sys.executable, "-c", code) as python:
        python.finish(timeout=60)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    share = str(max(1, cores // 2))
    assert python.stdout.split() == ["threads", share, share] * 2, python.stderr


@pytest.mark.parametrize("cap", ["0", "two", "-1"])
def test_a_bad_thread_cap_is_named_at_import(cap):
    env = dict(os.environ, METAPEFT_NUM_THREADS=cap)
    result = subprocess.run(
        [sys.executable, "-c", "import metapeft"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert f"METAPEFT_NUM_THREADS must be a positive integer, got {cap!r}" in result.stderr


@launched
def test_evaluate_on_two_ranks_splits_the_tasks_and_matches_one_process(tmp_path):
    run("train", *SINUSOID, "--num-iterations", "4", "--output-dir", tmp_path / "run")
    best = tmp_path / "run" / "checkpoints" / "best.safetensors"
    args = ["evaluate", best, "--tasks", "31", "--steps", "3"]
    run(*args, "--metrics-out", tmp_path / "one.json")
    launched = launch(2, *args, "--metrics-out", tmp_path / "two.json", timeout=120)
    assert launched.exit_codes() == {}, launched.stderr
    assert launched.stdout.count("query loss after 3 steps on 31 tasks") == 1  # rank 0 alone
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one.keys() == two.keys()
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
