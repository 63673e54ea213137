"""``metapeft bench``: run the standard suite, compare two runs, or report a result file."""

from __future__ import annotations

import json
import shlex
from datetime import date
from pathlib import Path
from typing import Annotated

import typer

from metapeft.console import fail

app = typer.Typer(
    name="bench",
    help="Benchmark the fused paths against their references; compare and report results.",
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _new_stem(folder: Path) -> Path:
    """``folder/<date>``, or ``<date>-2``... if a run of that day is already there."""
    stem, n = folder / date.today().isoformat(), 1
    while stem.with_suffix(".json").exists():
        n += 1
        stem = folder / f"{date.today().isoformat()}-{n}"
    return stem


@app.callback(invoke_without_command=True)
def run(
    ctx: typer.Context,
    quick: Annotated[
        bool, typer.Option("--quick", help="Small sizes and few repeats (a minute or two).")
    ] = False,
    output_dir: Annotated[
        Path, typer.Option(help="Results folder; the run goes to <output-dir>/<machine-id>/.")
    ] = Path("results"),
    plots: Annotated[bool, typer.Option(help="Write PNG plots beside the report.")] = True,
) -> None:
    """Run the standard suite; write <date>.json, <date>.md and plots, update the index."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from metapeft import machine
    from metapeft.bench import report, suite
    from metapeft.bench.runner import BenchmarkRunner, prepare_process
    from metapeft.files import atomic_write_text

    folder = output_dir / machine.machine_id()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise fail(f"cannot write to {folder}: {e.strerror or e}") from None
    console = Console()
    runner = BenchmarkRunner("metapeft bench" + (" --quick" if quick else ""))
    runner.conditions = prepare_process()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    try:
        with Progress(*columns, console=console, transient=True) as progress:
            failures = suite.run(suite.sizes(quick), runner, progress)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: nothing written[/]")
        raise typer.Exit(code=130) from None
    stem = _new_stem(folder)
    data = runner.to_dict()
    data["command"] = shlex.join(
        ["metapeft", "bench"]
        + (["--quick"] if quick else [])
        + (["--output-dir", str(output_dir)] if output_dir != Path("results") else [])
    )
    data["quick"] = quick
    data["failures"] = failures
    data["memory_budget_bytes"] = report.physical_memory()
    atomic_write_text(stem.with_suffix(".json"), json.dumps(data, indent=1) + "\n")
    written = report.plot(data, stem) if plots else []
    atomic_write_text(stem.with_suffix(".md"), report.markdown(data, written))
    report.update_index(output_dir)
    typer.echo(runner.summary())
    console.print(
        f"wrote {stem.with_suffix('.json')}, {stem.with_suffix('.md')} and "
        f"{len(written)} plots; index {output_dir / 'README.md'}"
    )
    if failures:
        raise fail(
            f"{len(failures)} benchmark(s) failed (listed in {stem.with_suffix('.md')}): "
            + "; ".join(f"{f['label']} {f['params']}: {f['error']}" for f in failures)
        )


@app.command()
def compare(
    a: Annotated[Path, typer.Argument(help="First result file (e.g. an older run).")],
    b: Annotated[Path, typer.Argument(help="Second result file.")],
    out: Annotated[Path | None, typer.Option(help="Write the Markdown here.")] = None,
) -> None:
    """Two runs side by side (other machines or commits), with B's speed-up over A."""
    from metapeft.bench import report

    try:
        text = report.compare(report.load(a), report.load(b), names=(a.stem, b.stem))
    except (ValueError, FileNotFoundError) as e:
        raise fail(str(e)) from None
    _emit(text, out)


@app.command("report")
def report_command(
    result: Annotated[Path, typer.Argument(help="A metapeft bench or pytest-benchmark JSON.")],
    out: Annotated[Path | None, typer.Option(help="Write the Markdown here.")] = None,
    plots: Annotated[
        bool, typer.Option(help="Redraw the PNG plots beside the result file and link them.")
    ] = False,
) -> None:
    """A result file as Markdown (also reads ``pytest --benchmark-json`` output)."""
    from metapeft.bench import report

    try:
        data = json.loads(result.read_text())
    except (OSError, ValueError) as e:
        raise fail(f"{result}: cannot read ({e})") from None
    if isinstance(data, dict) and "benchmarks" in data:
        text = report.pytest_markdown(data)
    else:
        try:
            data = report.load(result)
        except ValueError as e:
            raise fail(str(e)) from None
        drawn = report.plot(data, result.with_suffix("")) if plots else None
        text = report.markdown(data, drawn)
    _emit(text, out)


def _emit(text: str, out: Path | None) -> None:
    if out is None:
        typer.echo(text, nl=False)
        return
    from metapeft.files import atomic_write_text

    atomic_write_text(out, text)
