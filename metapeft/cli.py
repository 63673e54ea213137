"""The ``metapeft`` command line: ``info``, ``validate``, ``train``, ``evaluate``, ``bench``.

Commands are thin: they parse options, call the library and print. Heavy modules
are imported inside the commands so that ``--help`` stays fast. Expected errors
(a bad config, a missing checkpoint) print one line and exit with status 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from metapeft.bench.cli import app as bench_app

app = typer.Typer(
    name="metapeft",
    help="Meta-learning parameter-efficient fine-tuning on MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config; default: the packaged one.")
]
ProfileOption = Annotated[
    str | None, typer.Option(help="Config profile to overlay, e.g. dev or prod.")
]


def _fail(message: str) -> typer.Exit:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code=1)


def _load_config(config: Path | None, profile: str | None, overrides: dict):
    from metapeft.config import MetaLearningConfig

    if config is None:
        return MetaLearningConfig.default(profile=profile, overrides=overrides)
    return MetaLearningConfig.from_yaml(config, profile=profile, overrides=overrides)


@app.command()
def info() -> None:
    """Version, backend, BLAS and chip, and whether the compiled extension loads."""
    from rich.console import Console
    from rich.table import Table

    from metapeft import machine

    table = Table(show_header=False, box=None)
    for key, value in machine.info().items():
        table.add_row(key, str(value))
    try:
        from metapeft import _ext  # noqa: F401

        table.add_row("extension", "loaded")
    except ImportError as e:  # pragma: no cover - an install problem
        table.add_row("extension", f"[red]failed: {e}[/]")
    Console().print(table)


@app.command()
def validate(config: ConfigOption = None, profile: ProfileOption = None) -> None:
    """Check the install and a config: fused ops and a tiny meta-step against the references."""
    from metapeft import selfcheck

    try:
        cfg = _load_config(config, profile, {})
    except (ValueError, FileNotFoundError) as e:
        raise _fail(str(e)) from None
    if not selfcheck.run() or not selfcheck.run_learner(cfg):
        raise _fail("the fused path disagrees with the reference (see above)")


@app.command()
def train(
    config: ConfigOption = None,
    profile: ProfileOption = None,
    num_iterations: Annotated[int | None, typer.Option(help="Meta-steps to run.")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="Where outputs go.")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Save 'last' every N steps.")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the model and the task sampler.")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from OUTPUT_DIR/checkpoints/last.")
    ] = False,
) -> None:
    """Meta-train as the config says (the packaged sinusoid MAML config by default)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.table import Table

    from metapeft import training

    overrides = {
        "training": {
            "num_iterations": num_iterations,
            "checkpoint_every": checkpoint_every,
            "seed": seed,
        },
        "output": {"output_dir": output_dir},
    }
    try:
        cfg = _load_config(config, profile, overrides)
    except (ValueError, FileNotFoundError) as e:
        raise _fail(str(e)) from None
    console = Console()
    t = cfg.training
    console.print(
        f"[bold]{t.algorithm}[/] on [bold]{cfg.task.family}[/]: {t.num_iterations} meta-steps of "
        f"{t.meta_batch_size} tasks -> {cfg.output.output_dir}"
    )
    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
        console=console,
    )
    with progress:
        bar = progress.add_task("meta-training", total=t.num_iterations, status="")

        def on_step(step: int, m: dict[str, float]) -> None:
            status = (
                f"query {m['query_loss']:.4f}  support {m['support_loss']:.4f}  "
                f"{m['steps_per_s']:.0f} steps/s"
            )
            progress.update(bar, completed=step, status=status)

        try:
            summary = training.train(cfg, resume=resume, on_step=on_step)
        except KeyboardInterrupt:
            progress.stop()
            console.print("[yellow]interrupted:[/] saved checkpoints/last; continue with --resume")
            raise typer.Exit(code=130) from None
        except (ValueError, FileNotFoundError, FloatingPointError) as e:
            progress.stop()
            raise _fail(str(e)) from None
    table = Table(title="summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("meta-steps", str(summary["steps"]))
    for key, value in summary["final"].items():
        table.add_row(key, f"{value:.4f}")
    table.add_row("best val query loss", f"{summary['best_val_query_loss']:.4f}")
    table.add_row("outputs", summary["output_dir"])
    console.print(table)


@app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by 'metapeft train'.")],
    steps: Annotated[
        int | None, typer.Option(help="Adaptation steps; default from the config.")
    ] = None,
    tasks: Annotated[int, typer.Option(help="Held-out tasks to adapt to.")] = 600,
) -> None:
    """Adapt a trained checkpoint to held-out tasks; print the query loss with a 95% CI."""
    import numpy as np
    from rich.console import Console

    from metapeft import training
    from metapeft.config import MetaLearningConfig

    config_path = checkpoint.parent.parent / "config.yaml"
    try:
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: no config.yaml beside the checkpoint's run")
        cfg = MetaLearningConfig.from_yaml(config_path)
        learner = training.build_learner(cfg, training.build_model(cfg))
        learner.load(checkpoint)
    except (ValueError, FileNotFoundError) as e:
        raise _fail(str(e)) from None
    _, eval_tasks = training.task_distributions(cfg)
    metric_fn = training.accuracy if cfg.training.loss == "cross_entropy" else None
    steps = cfg.training.eval_steps if steps is None else steps
    result = learner.evaluate(eval_tasks.sample(tasks), steps, metric_fn=metric_fn)
    console = Console()
    for name, values in [
        ("query loss", result["query_losses"]),
        ("accuracy", result.get("query_metrics")),
    ]:
        if values is not None:
            half = 1.96 * values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
            console.print(
                f"{name} after {steps} steps on {tasks} tasks: {values.mean():.4f} ± {half:.4f}"
            )


app.add_typer(bench_app, name="bench")


def main() -> None:
    app()
