"""Reports of benchmark results: Markdown, PNG plots, comparisons of two runs, and
the index of machines in ``results/README.md``.

Within a run (the JSON of :meth:`BenchmarkRunner.save`), operations with the same
label that differ only in ``impl`` form a *comparison* (every implementation against
``fused``), and those that differ only in one numeric parameter form a *sweep*.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metapeft.bench.runner import format_bytes, format_seconds
from metapeft.files import atomic_write_text

SWEEP_KEYS = ("tasks", "rank", "inner_steps")
_UNIT = {"tasks": "task", "rank": "unit of rank", "inner_steps": "inner step"}
INDEX_START, INDEX_END = "<!-- bench-index:start -->", "<!-- bench-index:end -->"


def load(path: str | Path) -> dict[str, Any]:
    """A saved run; ``ValueError`` naming the file if it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a benchmark result file ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("operations"), list):
        raise ValueError(f"{path}: not a benchmark result file (no 'operations' list)")
    return data


@dataclass
class Comparison:
    label: str
    params: dict[str, Any]
    ops: dict[str, dict[str, Any]]  # impl -> operation

    @property
    def title(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.label} ({extra})" if extra else self.label


@dataclass
class Sweep:
    label: str
    key: str
    params: dict[str, Any]  # the fixed ones, impl included
    points: list[tuple[int, dict[str, Any]]]  # (value, operation), sorted

    @property
    def title(self) -> str:
        fixed = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.label} against {self.key} ({fixed})"


def _without(params: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k != key}


def _group(ops: list[dict[str, Any]], key: str) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for op in ops:
        if key in op["params"]:
            rest = json.dumps(_without(op["params"], key), sort_keys=True)
            groups[(op["label"], rest)].append(op)
    return groups


def comparisons(data: dict[str, Any]) -> list[Comparison]:
    """Groups with a ``fused`` implementation and at least one other."""
    out = []
    for (label, rest), ops in _group(data["operations"], "impl").items():
        by_impl = {op["params"]["impl"]: op for op in ops}
        if "fused" in by_impl and len(by_impl) > 1:
            out.append(Comparison(label, json.loads(rest), by_impl))
    return out


def sweeps(data: dict[str, Any], min_points: int = 3) -> list[Sweep]:
    """Series over one of :data:`SWEEP_KEYS` with the other parameters fixed."""
    out = []
    for key in SWEEP_KEYS:
        for (label, rest), ops in _group(data["operations"], key).items():
            if len({op["params"][key] for op in ops}) >= min_points:
                points = sorted((op["params"][key], op) for op in ops)
                out.append(Sweep(label, key, json.loads(rest), points))
    return out


# --------------------------------------------------------------------- scaling
def linearity(sweep: Sweep) -> str:
    """How the cost grows along the sweep: per task or inner step, where the cost per
    unit is within 25% of its best; for rank, the growth over the whole range."""
    if sweep.key == "rank":
        (r0, first), (r1, last) = sweep.points[0], sweep.points[-1]
        c0, c1 = first["median_s"], last["median_s"]
        # cost = a + b * rank through the two ends: a is the part the rank does not touch.
        a = c0 - (c1 - c0) / (r1 - r0) * r0 if r1 != r0 else c0
        return (
            f"From rank={r0} to rank={r1} ({r1 / r0:g}x the rank) a meta-step costs "
            f"{c1 / c0:.2f}x as much. A line through the two ends puts the part that does "
            f"not depend on the rank at {a / c0:.0%} of the step at rank={r0} and "
            f"{a / c1:.0%} at rank={r1}."
        )
    per = [(v, op["median_s"] / v) for v, op in sweep.points if v > 0]
    best_v, best = min(per, key=lambda p: p[1])
    near = [v for v, c in per if c <= 1.25 * best]
    first, last = per[0], per[-1]
    text = (
        f"Cost per {_UNIT[sweep.key]} is lowest at {sweep.key}={best_v} "
        f"({format_seconds(best)}); within 25% of that for {sweep.key} in "
        f"[{min(near)}, {max(near)}]"
    )
    if first[1] > 1.25 * best:
        text += f"; at {sweep.key}={first[0]} a fixed cost dominates ({first[1] / best:.1f}x)"
    if last[1] > 1.25 * best and last[0] > best_v:
        text += f"; at {sweep.key}={last[0]} it has grown {last[1] / best:.2f}x (not linear)"
    return text + "."


@dataclass
class MemoryFit:
    intercept: float  # bytes
    per_task: float  # bytes per task
    r2: float
    budget: int
    max_tasks: int


def memory_fit(sweep: Sweep, budget: int) -> MemoryFit | None:
    """Least-squares ``peak = intercept + per_task * T`` over a ``tasks`` sweep, and the
    largest ``T`` whose predicted peak fits in ``budget`` bytes."""
    pts = [(v, op["peak_memory_bytes"]) for v, op in sweep.points if op["peak_memory_bytes"]]
    if sweep.key != "tasks" or len(pts) < 2:
        return None
    n = len(pts)
    mx_ = sum(v for v, _ in pts) / n
    my = sum(m for _, m in pts) / n
    sxx = sum((v - mx_) ** 2 for v, _ in pts)
    slope = sum((v - mx_) * (m - my) for v, m in pts) / sxx
    intercept = my - slope * mx_
    ss_tot = sum((m - my) ** 2 for _, m in pts)
    ss_res = sum((m - intercept - slope * v) ** 2 for v, m in pts)
    r2 = 1 - ss_res / ss_tot if ss_tot else 1.0
    max_tasks = math.floor((budget - intercept) / slope) if slope > 0 else 0
    return MemoryFit(intercept, slope, r2, budget, max(max_tasks, 0))


def physical_memory() -> int:
    """Bytes of RAM on this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# -------------------------------------------------------------------- Markdown
def stamp(data: dict[str, Any]) -> str:
    """One line naming the machine and the run."""
    m = data["machine"]
    line = (
        f"Machine: {m.get('chip')}, {m.get('cores')} cores, {m.get('os')} {m.get('arch')}, "
        f"Python {m.get('python')}, MLX {m.get('mlx')} ({m.get('backend')}), "
        f"BLAS {m.get('blas')}, metapeft {m.get('metapeft')} ({m.get('commit')}); "
        f"run {data.get('started')}"
    )
    if data.get("conditions"):
        line += "; conditions: " + ", ".join(f"{k} {v}" for k, v in data["conditions"].items())
    return line


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def markdown(data: dict[str, Any], plots: list[Path] | None = None) -> str:
    """The whole report of one run."""
    lines = [f"# {data.get('name', 'benchmarks')}", "", stamp(data), ""]
    if data.get("command"):
        lines += ["```bash", data["command"], "```", ""]
    if data.get("failures"):
        lines += ["## Failed", "", "| operation | parameters | error |", "|---|---|---|"]
        lines += [
            f"| {f['label']} | {_params(f['params'])} | `{f['error']}` |" for f in data["failures"]
        ]
        lines.append("")
    comps = comparisons(data)
    if comps:
        lines += [
            "## Fused against the alternatives",
            "",
            "Medians; *speed-up* is the other implementation's median over the fused one's.",
            "",
            "| operation | implementation | median | speed-up of fused | peak memory |",
            "|---|---|---:|---:|---:|",
        ]
        for c in comps:
            fused = c.ops["fused"]["median_s"]
            for impl, op in sorted(c.ops.items(), key=lambda kv: kv[1]["median_s"]):
                ratio = "-" if impl == "fused" else f"{op['median_s'] / fused:.2f}x"
                lines.append(
                    f"| {c.title} | {impl} | {format_seconds(op['median_s'])} | {ratio} "
                    f"| {format_bytes(op['peak_memory_bytes'])} |"
                )
        lines.append("")
    budget = data.get("memory_budget_bytes") or physical_memory()
    for sw in sweeps(data):
        lines += [f"## {sw.title}", "", linearity(sw), ""]
        unit = "vs the first" if sw.key == "rank" else f"per {_UNIT[sw.key]}"
        lines += [
            f"| {sw.key} | median | meta-steps/s | {unit} | peak memory |",
            "|---:|---:|---:|---:|---:|",
        ]
        first = sw.points[0][1]["median_s"]
        for v, op in sw.points:
            if sw.key == "rank":
                per = f"{op['median_s'] / first:.2f}x"
            else:
                per = format_seconds(op["median_s"] / v) if v else "-"
            lines.append(
                f"| {v} | {format_seconds(op['median_s'])} | {1 / op['median_s']:.2f} | {per} "
                f"| {format_bytes(op['peak_memory_bytes'])} |"
            )
        fit = memory_fit(sw, budget)
        if fit:
            lines += [
                "",
                f"Peak memory = {format_bytes(int(fit.intercept))} + "
                f"{format_bytes(int(fit.per_task))} x T (least squares, R^2 = {fit.r2:.3f}). "
                f"The intercept is what every task shares (the model, the meta-parameters, "
                f"the optimizer state), the slope what each task adds (its adapted "
                f"parameters and the activations kept for the backward pass through the "
                f"inner loop). Extrapolated from the T = {sw.points[0][0]} to "
                f"{sw.points[-1][0]} measured, the largest T "
                f"whose step fits in {format_bytes(fit.budget)} of memory is "
                f"**{fit.max_tasks}**.",
            ]
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------- plots
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def plot(data: dict[str, Any], stem: Path) -> list[Path]:
    """PNG plots beside ``stem``: one per sweep (meta-steps/s and tasks/s), peak memory
    against T, and the fused speed-ups; returns the paths written."""
    from metapeft.plotting import new_figure, save_png

    written = []
    for sw in sweeps(data):
        xs = [v for v, _ in sw.points]
        fig, ax = new_figure(5, 3.5)
        steps = [1 / op["median_s"] for _, op in sw.points]
        ax.plot(xs, steps, "o-", label="meta-steps/s")
        if sw.key == "tasks":
            ax.plot(xs, [v / op["median_s"] for v, op in sw.points], "s--", label="tasks/s")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(sw.key)
        ax.set_ylabel("throughput")
        ax.set_title(sw.title, fontsize=7)
        ax.legend(fontsize=7)
        path = stem.with_name(
            f"{stem.name}-{_slug(sw.label)}-{_slug(_params(sw.params))}-vs-{sw.key}.png"
        )
        written.append(save_png(fig, path))
        if sw.key == "tasks":
            fig, ax = new_figure(5, 3.5)
            ax.plot(xs, [op["peak_memory_bytes"] / 2**20 for _, op in sw.points], "o-")
            ax.set_xlabel("tasks per meta-batch (T)")
            ax.set_ylabel("peak memory (MiB)")
            ax.set_title(f"{sw.label}: peak memory ({_params(sw.params)})", fontsize=7)
            memory = path.with_name(path.name.replace("-vs-tasks", "-memory-vs-tasks"))
            written.append(save_png(fig, memory))
    comps = comparisons(data)
    if comps:
        bars = [
            (f"{c.title}\nvs {impl}", op["median_s"] / c.ops["fused"]["median_s"])
            for c in comps
            for impl, op in c.ops.items()
            if impl != "fused"
        ]
        fig, ax = new_figure(7, 0.28 * len(bars) + 1.2)
        ax.barh(range(len(bars)), [r for _, r in bars], color="tab:green")
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_yticks(range(len(bars)), [n for n, _ in bars], fontsize=5)
        ax.set_xscale("log")
        ax.set_xlabel("speed-up of fused (other median / fused median)")
        ax.invert_yaxis()
        written.append(save_png(fig, stem.with_name(f"{stem.name}-speedups.png")))
    return written


# --------------------------------------------------------------------- compare
def compare(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("A", "B")) -> str:
    """Operations recorded in both runs side by side; *speed-up* is A's median over B's."""
    index = {(op["label"], json.dumps(op["params"], sort_keys=True)): op for op in b["operations"]}
    na, nb = names
    lines = [
        f"**{na}**: {stamp(a)}",
        "",
        f"**{nb}**: {stamp(b)}",
        "",
        f"| operation | parameters | {na} | {nb} | speed-up of {nb} | "
        f"peak memory {na} | peak memory {nb} |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    matched = 0
    for op in a["operations"]:
        other = index.get((op["label"], json.dumps(op["params"], sort_keys=True)))
        if other is None:
            continue
        matched += 1
        lines.append(
            f"| {op['label']} | {_params(op['params'])} | {format_seconds(op['median_s'])} "
            f"| {format_seconds(other['median_s'])} | {op['median_s'] / other['median_s']:.2f}x "
            f"| {format_bytes(op['peak_memory_bytes'])} "
            f"| {format_bytes(other['peak_memory_bytes'])} |"
        )
    if not matched:
        raise ValueError(f"{na} and {nb} have no operation in common (same label and parameters)")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------- index
_RUN = re.compile(r"(\d{4}-\d{2}-\d{2})(?:-(\d+))?")


def latest_runs(results: Path) -> dict[str, Path]:
    """The newest suite result of each machine folder: ``<date>.json``, then
    ``<date>-2.json``, ``<date>-3.json``... for later runs of the same day."""
    out = {}
    for folder in sorted(p for p in results.iterdir() if p.is_dir()):
        runs = {}
        for path in folder.glob("*.json"):
            if m := _RUN.fullmatch(path.stem):
                runs[(m[1], int(m[2] or 1))] = path
        if runs:
            out[folder.name] = runs[max(runs)]
    return out


def update_index(results: Path) -> Path:
    """Rewrite the machine index between the markers of ``results/README.md`` (adding
    them at the end if missing): each machine's newest run and its comparisons."""
    readme = results / "README.md"
    text = readme.read_text() if readme.exists() else "# Measured results\n"
    lines = [
        INDEX_START,
        "## Latest `metapeft bench` run of each machine",
        "",
        "| machine | chip | cores | OS | MLX | backend | run | report |",
        "|---|---|---:|---|---|---|---|---|",
    ]
    tables = []
    for name, path in latest_runs(results).items():
        data = load(path)
        m = data["machine"]
        rel = path.relative_to(results)
        lines.append(
            f"| {name} | {m.get('chip')} | {m.get('cores')} | {m.get('os')} | {m.get('mlx')} "
            f"| {m.get('backend')} | {data.get('started', '')[:10]} "
            f"| [{rel.with_suffix('.md')}]({rel.with_suffix('.md')}) |"
        )
        rows = [
            f"| {c.title} | {format_seconds(c.ops['fused']['median_s'])} | "
            + "; ".join(
                f"{impl} {op['median_s'] / c.ops['fused']['median_s']:.2f}x"
                for impl, op in c.ops.items()
                if impl != "fused"
            )
            + " |"
            for c in comparisons(data)
        ]
        if rows:
            tables += [
                "",
                f"### {name}: speed-up of fused",
                "",
                "| operation | fused median | other implementation: its median over fused's |",
                "|---|---:|---|",
                *rows,
            ]
    block = "\n".join(lines + tables + [INDEX_END])
    if INDEX_START in text and INDEX_END in text:
        head, rest = text.split(INDEX_START, 1)
        text = head + block + rest.split(INDEX_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    return atomic_write_text(readme, text)


# ------------------------------------------------------- pytest-benchmark files
def pytest_markdown(data: dict[str, Any]) -> str:
    """A ``pytest --benchmark-json`` file as a table of ratios within each group."""
    info = data.get("machine_info", {})
    m, conditions = info.get("metapeft_machine") or {}, info.get("metapeft_conditions")
    lines = [
        stamp({"machine": m, "started": data.get("datetime"), "conditions": conditions}),
        "",
        "| group | implementation | median | speed-up of fused | peak memory |",
        "|---|---|---:|---:|---:|",
    ]
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        groups[bench["group"]][bench.get("params", {}).get("impl") or bench["name"]] = bench
    for group, benches in groups.items():
        fused = benches["fused"]["stats"]["median"] if "fused" in benches else None
        for impl, bench in sorted(benches.items(), key=lambda kv: kv[1]["stats"]["median"]):
            median = bench["stats"]["median"]
            ratio = f"{median / fused:.2f}x" if fused and impl != "fused" else "-"
            peak = bench.get("extra_info", {}).get("peak_memory_bytes", 0)
            lines.append(
                f"| {group} | {impl} | {format_seconds(median)} | {ratio} | {format_bytes(peak)} |"
            )
    return "\n".join(lines) + "\n"
