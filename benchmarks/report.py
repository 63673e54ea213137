"""Summarise a pytest-benchmark JSON file as a Markdown table of ratios.

Usage: ``python benchmarks/report.py results/<machine>/ops.json [--out FILE]``.
Within each group, every implementation's median is compared with the fused one.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def _impl(bench: dict) -> str:
    return bench.get("params", {}).get("impl") or bench["name"]


def report(data: dict) -> str:
    m = data["machine_info"]
    lines = [
        f"Machine: {m.get('cpu', {}).get('brand_raw', m.get('processor'))}, "
        f"{m.get('cpu', {}).get('count', '?')} cores, {m.get('system')} {m.get('release')}, "
        f"Python {m.get('python_version')}, mlx {m.get('mlx_version')} on {m.get('mlx_device')}, "
        f"BLAS {m.get('blas')}, metapeft {m.get('metapeft_version')} "
        f"({m.get('metapeft_commit')}); run {data.get('datetime', '?')}",
        "",
        "| group | implementation | median | fused is faster by | peak memory |",
        "|---|---|---:|---:|---:|",
    ]
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        groups[bench["group"]][_impl(bench)] = bench
    for group, benches in groups.items():
        fused = benches["fused"]["stats"]["median"] if "fused" in benches else None
        for impl, bench in sorted(benches.items(), key=lambda kv: kv[1]["stats"]["median"]):
            median = bench["stats"]["median"]
            ratio = f"{median / fused:.2f}x" if fused else "-"
            peak = bench.get("extra_info", {}).get("peak_memory_bytes")
            memory = f"{peak / 2**20:.1f} MiB" if peak else "-"
            lines.append(f"| {group} | {impl} | {_fmt(median)} | {ratio} | {memory} |")
    return "\n".join(lines) + "\n"


def _fmt(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="pytest-benchmark --benchmark-json output")
    parser.add_argument("--out", type=Path, help="write the Markdown here instead of stdout")
    args = parser.parse_args()
    text = report(json.loads(args.json.read_text()))
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
