"""Meta-step time on 1, 2 and 3 ranks of this host (``mlx.launch``, ring backend), the
bytes each meta-step all-reduces, and a cost model that projects scaling efficiency
to 2, 4 and 8 hosts on 10 GbE and on Thunderbolt 5.

The problems are the suite's: sinusoid MAML (T = 24), LoRA MAML on 4 layers of
1024 x 1024 (rank 8, 64 rows, T = 12), and FOMAML on SmolLM2-135M's q/v adapters over
the packaged text tasks (T = 6; skipped when the model has not been fetched).

The projection: a meta-step of T tasks on one process takes ``f + c T`` (fitted on
this machine at T, T/2, T/4 and T/8 tasks in one process), so on N hosts it takes
``f + c T / N + allreduce(bytes, N)``, with a ring all-reduce costing
``2 (N - 1) latency + 2 (N - 1) / N * bytes / bandwidth``. The links' latency and
bandwidth are assumptions written in :data:`LINKS`, beside the loopback ring measured
by ``experiments/ring_allreduce.py``; the efficiency is ``t_1 / (N t_N)``. It is a
projection, not a measurement.

Usage:
    python experiments/distributed_scaling.py \\
        --ring results/<machine>/ring_allreduce_2.json --out results/<machine>/distributed_scaling
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from metapeft import machine
from metapeft.bench import problems
from metapeft.lm.gguf import models_dir

TASKS = {"sinusoid": 24, "lora": 12, "smollm2": 6}
RANKS = (1, 2, 3)
HOSTS = (2, 4, 8)
# Assumed links (not measured here): latency per message and bandwidth per direction.
LINKS = {
    "10 GbE (TCP ring)": {"latency_s": 50e-6, "bandwidth_GB_per_s": 1.1},
    "Thunderbolt 5 (JACCL, RDMA)": {"latency_s": 10e-6, "bandwidth_GB_per_s": 8.0},
}
SMOLLM2 = models_dir() / "smollm2-135m"


def build(problem: str, tasks: int):
    """``(learner, episodes, loss_fn)`` for one of the problems."""
    if problem == "sinusoid":
        learner = problems.make_learner(
            "maml", problems.sinusoid_net(), inner_steps=1, batched=True
        )
        return learner, problems.sinusoid_episodes(tasks), problems.mse
    if problem == "lora":
        model = problems.lora_net(1024, 8, 4, fused=True)
        learner = problems.make_learner("maml", model, inner_steps=1, batched=True)
        return learner, problems.lora_episodes(tasks, 64, 1024), problems.mse
    from metapeft import lm

    configs = Path(__file__).resolve().parents[1] / "metapeft" / "configs"
    model, tokenizer, _ = lm.load_model(SMOLLM2)
    lm.add_lora(model, lm.LoRASpec(rank=8, keys=("self_attn.q_proj", "self_attn.v_proj")))
    text = lm.TextTasks.from_jsonl(configs / "text_tasks_train.jsonl", tokenizer, 4, 4)
    learner = lm.build_learner(model, "fomaml", 0.05, 1, 1e-3, True)
    return learner, text.sample(tasks), None


def time_steps(learner, episodes, loss_fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        learner.meta_train_step(episodes, loss_fn)
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        learner.meta_train_step(episodes, loss_fn)
        times.append(time.perf_counter() - tic)
    return float(np.median(times))


def worker(args) -> None:
    """One rank: the problem's meta-step on this rank's share; rank 0 prints a JSON line."""
    group = mx.distributed.init()
    learner, episodes, loss_fn = build(args.worker, args.tasks or TASKS[args.worker])
    learner.group = group
    seconds = time_steps(learner, episodes, loss_fn, args.warmup, args.repeats)
    reduced = sum(v.nbytes for _, v in tree_flatten(learner.meta_parameters()))
    if group.rank() == 0:
        print(json.dumps({"seconds": seconds, "allreduce_bytes": reduced}), flush=True)


def launch(problem: str, ranks: int, args, tasks: int | None = None) -> dict:
    """The problem's median meta-step on ``ranks`` ranks of this host, in fresh processes."""
    command = [sys.executable, __file__, "--worker", problem, "--tasks", str(tasks or 0)]
    command += ["--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    if ranks > 1:
        launcher = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
        command = [launcher, "-n", str(ranks), "--backend", "ring", "--", *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{problem} on {ranks} ranks printed no result:\n{done.stderr[-2000:]}")
    return json.loads(lines[-1])


def fit_fixed_and_per_task(problem: str, args) -> tuple[float, float, list]:
    """``f`` and ``c`` of ``t(T) = f + c T`` from one process at T, T/2, T/4, T/8."""
    total = TASKS[problem]
    counts = sorted({max(1, total // d) for d in (1, 2, 4, 8)})
    points = [(count, launch(problem, 1, args, count)["seconds"]) for count in counts]
    c, f = np.polyfit([p[0] for p in points], [p[1] for p in points], 1)
    return float(max(f, 0.0)), float(c), points


def ring_time(nbytes: int, hosts: int, latency: float, bandwidth: float) -> float:
    return 2 * (hosts - 1) * latency + 2 * (hosts - 1) / hosts * nbytes / (bandwidth * 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=sorted(TASKS), help=argparse.SUPPRESS)
    parser.add_argument("--tasks", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--problems", nargs="+", choices=sorted(TASKS), default=list(TASKS))
    parser.add_argument("--ring", type=Path, help="ring_allreduce.py's JSON (loopback fit)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    links = dict(LINKS)
    if args.ring:
        fit = json.loads(args.ring.read_text())["fit"]
        links["loopback ring (measured here)"] = fit
    names = [p for p in args.problems if p != "smollm2" or SMOLLM2.exists()]
    rows = []
    for problem in names:
        measured = {n: launch(problem, n, args) for n in RANKS}
        f, c, points = fit_fixed_and_per_task(problem, args)
        t1 = measured[1]["seconds"]
        nbytes = measured[1]["allreduce_bytes"]
        projected = {}
        for link, p in links.items():
            for hosts in HOSTS:
                comm = ring_time(nbytes, hosts, p["latency_s"], p["bandwidth_GB_per_s"])
                t = f + c * TASKS[problem] / hosts + comm
                projected[f"{link}, {hosts} hosts"] = {"seconds": t, "efficiency": t1 / (hosts * t)}
        rows.append(
            {
                "problem": problem,
                "tasks": TASKS[problem],
                "allreduce_bytes": nbytes,
                "measured": {str(n): m["seconds"] for n, m in measured.items()},
                "efficiency_here": {str(n): t1 / (n * m["seconds"]) for n, m in measured.items()},
                "fit": {"fixed_s": f, "per_task_s": c, "points": points},
                "projected": projected,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    table = [
        f"Meta-step medians on this host ({os.cpu_count()} cores; ranks beyond the cores share "
        "them, so more ranks cannot run faster here) and scaling efficiency t1 / (N tN):",
        "",
        "| problem | T | all-reduced per step | 1 rank | 2 ranks | 3 ranks |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [
            f"{r['measured'][str(n)] * 1e3:.1f} ms ({r['efficiency_here'][str(n)]:.0%})"
            for n in RANKS
        ]
        table.append(
            f"| {r['problem']} | {r['tasks']} | {r['allreduce_bytes'] / 1e6:.2f} MB | "
            + " | ".join(cells)
            + " |"
        )
    table += [
        "",
        "Projection (not a measurement): efficiency on N hosts, from t(T) = f + cT fitted "
        "here and a ring all-reduce over the link:",
        "",
        "| problem | f | c per task | " + " | ".join(f"{k}" for k in rows[0]["projected"]) + " |",
        "|---|---:|---:|" + "---:|" * len(rows[0]["projected"]),
    ]
    for r in rows:
        cells = [f"{v['efficiency']:.0%}" for v in r["projected"].values()]
        table.append(
            f"| {r['problem']} | {r['fit']['fixed_s'] * 1e3:.2f} ms | "
            f"{r['fit']['per_task_s'] * 1e3:.2f} ms | " + " | ".join(cells) + " |"
        )
    table += ["", "Links assumed: " + "; ".join(f"{k}: {v}" for k, v in links.items())]
    print("\n".join(table))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"machine": machine.info(), "links": links, "rows": rows}
        record["args"] = {k: str(v) for k, v in vars(args).items()}
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=2))
        args.out.with_suffix(".md").write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
