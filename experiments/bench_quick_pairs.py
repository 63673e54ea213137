"""Compares ``metapeft bench --quick`` runs of two commits, each run twice in turns:
metapeft's own operations, before against after (best of two each), beside the spread
of each side against itself (the noise).

Usage (the before-run from a venv built at the old commit):
    python experiments/bench_quick_pairs.py BEFORE1.json BEFORE2.json AFTER1.json AFTER2.json \
        --out results/<machine>/bench_quick_redesign
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def medians(path: Path) -> dict[tuple[str, str], float]:
    data = json.loads(path.read_text())
    return {
        (op["label"], json.dumps(op["params"], sort_keys=True)): op["median_s"]
        for op in data["operations"]
    }


def ours(params: str) -> bool:
    """metapeft's own implementations (not the peers')."""
    return json.loads(params).get("impl", "").split()[0] in ("fused", "naive", "reference", "mlx")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs=4, type=Path, help="before 1, before 2, after 1, after 2")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    b1, b2, a1, a2 = (medians(p) for p in args.runs)
    table = [
        "| operation | parameters | before (2 runs) | after (2 runs) | speed-up (best of 2 each) "
        "| spread within a side (the worse) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    worse = []
    count = 0
    for key in b1:
        if key not in a1 or not ours(key[1]):
            continue
        count += 1
        o1, o2, n1, n2 = b1[key], b2[key], a1[key], a2[key]
        spread = max(max(o1, o2) / min(o1, o2), max(n1, n2) / min(n1, n2))
        speed = min(o1, o2) / min(n1, n2)
        params = ", ".join(f"{k}={v}" for k, v in json.loads(key[1]).items())
        cells = f"{o1 * 1e3:.3f}, {o2 * 1e3:.3f} ms | {n1 * 1e3:.3f}, {n2 * 1e3:.3f} ms"
        table.append(f"| {key[0]} | {params} | {cells} | {speed:.2f}x | {spread:.2f}x |")
        if speed < 1 / spread:
            worse.append(f"{key[0]} ({params}): {speed:.2f}x, spread {spread:.2f}x")
    table += [
        "",
        f"{count} operations; slower after by more than the spread within a side: {len(worse)}",
        *(f"- {w}" for w in worse),
    ]
    text = "\n".join(table) + "\n"
    print(text)
    if args.out is not None:
        args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
