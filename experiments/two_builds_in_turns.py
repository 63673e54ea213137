"""Times a few operations under two installs of metapeft (two Python executables, e.g.
a venv built at an older commit and this one), each case in a fresh process, the two
alternating, several rounds: a direct check of what a quick benchmark run flags.

Usage:
    python experiments/two_builds_in_turns.py OLD_PYTHON NEW_PYTHON --rounds 3 \
        --out results/<machine>/two_builds_in_turns
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import numpy as np
from common import write_results

# Each case prints the median of 300 timed calls, in seconds, after 30 warm-up calls.
CASES = {
    "lora_linear fwd+bwd T=4 N=64 d=512 r=8": (
        "p = problems.lora_problem(4, 64, 512, 8)\n"
        "f = problems.lora_forward_backward('fused', p)\n"
        "run = lambda: mx.eval(f())\n"
    ),
    "lora maml meta-step T=1 d=256 r=8": (
        "run = problems.meta_step('lora', 'maml', 'fused', tasks=1, inner_steps=1, "
        "dim=256, rank=8, layers=2, rows=32)\n"
    ),
    "sinusoid maml meta-step T=25": (
        "run = problems.meta_step('sinusoid', 'maml', 'fused', tasks=25, inner_steps=1)\n"
    ),
}

TIMER = """
import time
import mlx.core as mx
import numpy as np
from metapeft.bench import problems
{setup}
for _ in range(30):
    run()
times = []
for _ in range(300):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
print(float(np.median(times)))
"""


def time_case(python: str, setup: str) -> float:
    # Run outside the source tree, so that the install of `python` is what is imported.
    out = subprocess.run(
        [python, "-c", TIMER.format(setup=setup)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
        cwd="/",
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old_python")
    parser.add_argument("new_python")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows, table = (
        [],
        [
            f"Medians of 300 calls per process; {args.rounds} rounds, old and new in turns.",
            "",
            "| case | old | new | new / old (median of rounds) |",
            "|---|---|---|---:|",
        ],
    )
    for name, setup in CASES.items():
        old, new = [], []
        for _ in range(args.rounds):
            old.append(time_case(args.old_python, setup))
            new.append(time_case(args.new_python, setup))
        ratio = float(np.median(new) / np.median(old))
        rows.append({"case": name, "old_s": old, "new_s": new, "new_over_old": ratio})
        cells = [", ".join(f"{t * 1e3:.3f}" for t in ts) + " ms" for ts in (old, new)]
        table.append(f"| {name} | {cells[0]} | {cells[1]} | {ratio:.2f} |")
    write_results(args.out, args, rows, table)


if __name__ == "__main__":
    main()
