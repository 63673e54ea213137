"""Where a sinusoid MAML meta-step's fixed cost goes: the nodes of its compiled graph by
kind (metapeft's MAML against plain MLX ``vmap`` + ``compile``), and, with Linux
``perf``, the CPU time of a run of metapeft's steps by library: the kernel (waking
MLX's CPU stream thread, which evaluates every node), libc (``malloc`` and ``free`` of
the nodes' buffers), MLX's graph code, the BLAS products, MLX's compiled elementwise
kernels, metapeft's own kernels and Python.

Usage:
    python experiments/sinusoid_step_profile.py --out results/<machine>/sinusoid_step_profile
"""

from __future__ import annotations

import argparse
import collections
import io
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from common import write_results
from mlx.utils import tree_flatten

from metapeft.bench import problems
from metapeft.bench.runner import prepare_process

# perf's shared objects, by what they do in a meta-step (the first pattern that matches).
LIBRARIES = [
    ("kernel (thread wake-ups, scheduling)", r"^\[kernel"),
    ("libc (malloc, free, copies)", r"^libc\.so"),
    ("MLX graph evaluation", r"^libmlx\.so"),
    ("BLAS products", r"mkl|openblas"),
    ("metapeft kernels", r"^_ext\."),
    ("Python", r"libpython|^python|\.cpython-"),
    ("MLX compiled elementwise kernels", r"^lib[A-Z]"),
]


def graph_kinds(outputs) -> collections.Counter:
    """The primitives of the graph behind ``outputs``, by name (MLX's fused elementwise
    kernels counted as one kind)."""
    dot = io.StringIO()
    mx.export_to_dot(dot, *outputs)
    names = re.findall(r'label ="([A-Za-z_]+)"', dot.getvalue())
    return collections.Counter("Compiled" if n.startswith("Compiled") else n for n in names)


def fused_graph(tasks: int) -> collections.Counter:
    episodes = problems.sinusoid_episodes(tasks)
    learner = problems.make_learner("maml", problems.sinusoid_net(), inner_steps=1, batched=True)
    for _ in range(2):  # the optimizer's state exists from the first step on
        learner.meta_train_step(episodes, problems.mse)
    step = learner._step_function(learner.loss_fn)
    meta = learner.meta_parameters()
    data = (episodes.support_x, episodes.support_y, episodes.query_x, episodes.query_y)
    out = step(meta, learner.optimizer_state(meta), *data)
    return graph_kinds([v for _, v in tree_flatten(out)])


def mlx_graph(tasks: int) -> collections.Counter:
    step, state = problems.mlx_vmap_compile_maml(problems.sinusoid_net(), problems.mse, 0.01, 1)
    episodes = problems.sinusoid_episodes(tasks)
    mx.eval(step(episodes), state)
    loss = step(episodes)
    return graph_kinds([loss] + [v for _, v in tree_flatten(state)])


def run_steps(tasks: int, steps: int) -> None:
    """The profiled child: warms up, says so, waits for a line on stdin (the profiler
    attached), then runs ``steps`` of metapeft's MAML meta-steps and prints their time."""
    prepare_process()
    step = problems.meta_step("sinusoid", "maml", "fused", tasks=tasks, inner_steps=1)
    for _ in range(50):
        step()
    print("ready", flush=True)
    sys.stdin.readline()
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    print(f"{(time.perf_counter() - tic) / steps * 1e3:.3f}", flush=True)


def perf_shares(tasks: int, steps: int) -> tuple[dict[str, float], float]:
    """Shares of the CPU samples of the steady steps (perf attached after the warm-up)
    by library kind, and the step's time."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "perf.data"
        child = subprocess.Popen(
            [sys.executable, __file__, "--child", str(tasks), str(steps)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError("the profiled child did not start; run it alone to see why")
        perf = subprocess.Popen(
            ["perf", "record", "-F", "4999", "-o", str(data), "-p", str(child.pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.0)  # perf attaches
        child.stdin.write("go\n")
        child.stdin.flush()
        ms = float(child.stdout.readline())
        child.wait(timeout=60)
        perf.wait(timeout=60)
        report = subprocess.run(
            ["perf", "report", "-i", str(data), "--no-children", "--sort", "dso", "--stdio"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    shares: dict[str, float] = collections.defaultdict(float)
    for line in report.splitlines():
        match = re.match(r"\s*([\d.]+)%\s+(\S+)", line)
        if not match:
            continue
        share, dso = float(match.group(1)), match.group(2)
        kind = next((k for k, pattern in LIBRARIES if re.search(pattern, dso)), "other")
        shares[kind] += share
    return dict(shares), ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=25)
    parser.add_argument("--steps", type=int, default=3000, help="profiled meta-steps")
    parser.add_argument("--no-perf", action="store_true", help="only count the graph's nodes")
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        run_steps(*args.child)
        return
    fused, plain = fused_graph(args.tasks), mlx_graph(args.tasks)
    kinds = sorted(set(fused) | set(plain), key=lambda k: -(fused[k] + plain[k]))
    table = [
        f"Sinusoid MAML (1-40-40-1, 10+10 shots, 1 inner step, T={args.tasks}).",
        "",
        "**Nodes of the compiled meta-step's graph**",
        "",
        "| kind | metapeft MAML | plain MLX vmap + compile |",
        "|---|---:|---:|",
        *(f"| {k} | {fused[k]} | {plain[k]} |" for k in kinds),
        f"| all | {sum(fused.values())} | {sum(plain.values())} |",
    ]
    rows: list[dict] = [{"graph": {"fused": dict(fused), "mlx": dict(plain)}}]
    if not args.no_perf and shutil.which("perf"):
        shares, ms = perf_shares(args.tasks, args.steps)
        rows.append({"perf_shares_percent": shares, "step_ms": ms, "steps": args.steps})
        table += [
            "",
            f"**CPU time of {args.steps} metapeft meta-steps by library** (Linux `perf` "
            f"attached after a warm-up, all threads; {ms:.3f} ms a step in this run)",
            "",
            "| where | share |",
            "|---|---:|",
            *(f"| {k} | {v:.1f}% |" for k, v in sorted(shares.items(), key=lambda kv: -kv[1])),
        ]
    write_results(args.out, args, rows, table)


if __name__ == "__main__":
    main()
