"""The ``metapeft`` command line: ``info``, ``validate``, ``train``, ``evaluate``,
``bench``, ``export``, ``plot``, ``registry``, ``toolkit``, ``meta-train-lora`` and
``convert-gguf``.

Commands are thin: they parse options, call the library and print. Heavy modules
are imported inside the commands so that ``--help`` stays fast. Expected errors
(a bad config, a missing checkpoint, an unwritable folder) print one line and exit
with status 1. The typer ``app`` is also a toolkit project (see :mod:`metapeft.toolkit`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from metapeft.bench.cli import app as bench_app
from metapeft.console import fail
from metapeft.distributed import DistributedError
from metapeft.tracking import TrackingError

# Errors that are the user's input or environment, not a bug: one line, exit 1.
USER_ERRORS = (ValueError, OSError, TrackingError, DistributedError)

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


def _load_config(config: Path | None, profile: str | None, overrides: dict):
    from metapeft.config import MetaLearningConfig

    if config is None:
        return MetaLearningConfig.default(profile=profile, overrides=overrides)
    return MetaLearningConfig.from_yaml(config, profile=profile, overrides=overrides)


def _world(rank_timeout: float | None = None):
    """The ranks of this run (one process without ``mlx.launch``): they connect here."""
    from metapeft import distributed
    from metapeft.config.schema import TrainingSection

    timeout = TrainingSection().rank_timeout if rank_timeout is None else rank_timeout
    return distributed.world(timeout)


def _fail_on(world, error: BaseException) -> typer.Exit:
    """:func:`fail` with the error signed by its rank when there are several."""
    return fail(f"{world.name}: {error}" if world.size > 1 else error)


@app.command()
def info() -> None:
    """Version, backend, BLAS and chip, and whether the compiled extension loads."""
    from rich.console import Console
    from rich.table import Table

    from metapeft import machine, shared

    try:
        world = _world()
    except USER_ERRORS as e:
        raise fail(e) from None
    if world.rank != 0:  # one table for the run, from rank 0
        return
    table = Table(show_header=False, box=None)
    for key, value in machine.info().items():
        table.add_row(key, str(value))
    ranks = f"{world.size} ranks, {world.backend} backend" if world.size > 1 else "1 process"
    table.add_row("world", ranks)
    for name in shared.TOOLKIT:
        table.add_row(name, f"from {shared.source(name)}")
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
    except USER_ERRORS as e:
        raise fail(e) from None
    if not selfcheck.run() or not selfcheck.run_learner(cfg):
        raise fail("the fused path disagrees with the reference (see above)")


@app.command()
def train(
    config: ConfigOption = None,
    profile: ProfileOption = None,
    num_iterations: Annotated[int | None, typer.Option(help="Meta-steps to run.")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="Where outputs go.")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Save 'last' every N steps.")] = None,
    eval_every: Annotated[
        int | None, typer.Option(help="Evaluate on held-out tasks every N steps.")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the model and the task sampler.")
    ] = None,
    meta_batch_size: Annotated[
        int | None, typer.Option(help="Tasks per meta-step (divisible by the ranks).")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from OUTPUT_DIR/checkpoints/last.")
    ] = False,
) -> None:
    """Meta-train as the config says (the packaged sinusoid MAML config by default).

    Under mlx.launch -n N, on N ranks: each adapts its share of every meta-batch, and
    rank 0 alone writes the outputs."""
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
            "eval_every": eval_every,
            "seed": seed,
            "meta_batch_size": meta_batch_size,
        },
        "output": {"output_dir": output_dir},
    }
    try:
        cfg = _load_config(config, profile, overrides)
        world = _world(cfg.training.rank_timeout)
    except USER_ERRORS as e:
        raise fail(e) from None
    console = Console(quiet=world.rank != 0)  # rank 0 reports for all
    ranks = f" on {world.size} ranks" if world.size > 1 else ""
    t = cfg.training
    tasks = cfg.task.family if cfg.lm is None else f"{cfg.lm.tasks_file.name} ({cfg.lm.model.name})"
    console.print(
        f"[bold]{t.algorithm}[/] on [bold]{tasks}[/]: {t.num_iterations} meta-steps of "
        f"{t.meta_batch_size} tasks{ranks} -> {cfg.output.output_dir}"
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
        except (*USER_ERRORS, FloatingPointError) as e:
            progress.stop()
            raise _fail_on(world, e) from None
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
    metrics_out: Annotated[
        Path | None,
        typer.Option(help="Also write the results as JSON here (e.g. a DVC metrics file)."),
    ] = None,
) -> None:
    """Adapt a trained checkpoint to held-out tasks; print the query loss with a 95% CI.
    Under ``mlx.launch`` the ranks split the tasks, and rank 0 alone prints and writes."""
    import json

    import numpy as np
    from rich.console import Console

    from metapeft import distributed, training
    from metapeft.files import atomic_write_text

    try:
        cfg = _run_config(checkpoint)
        run = training.setup(cfg)
        run.learner.load(checkpoint)
    except USER_ERRORS as e:
        raise fail(e) from None
    steps = cfg.training.eval_steps if steps is None else steps
    world = distributed.world(cfg.training.rank_timeout)
    run.learner.group = world.group
    episodes = run.eval_tasks.sample(tasks)
    try:
        with world.reporting_termination(), world.deadline("the evaluation"):
            result = run.learner.evaluate(episodes, steps, metric_fn=run.metric_fn)
    except DistributedError as e:
        raise _fail_on(world, e) from None
    if world.rank != 0:
        return
    console = Console()
    summary: dict[str, float | int] = {"steps": steps, "tasks": tasks}
    for name, values in [
        ("query loss", result["query_losses"]),
        ("accuracy", result.get("query_metrics")),
    ]:
        if values is not None:
            half = 1.96 * values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
            console.print(
                f"{name} after {steps} steps on {tasks} tasks: {values.mean():.4f} ± {half:.4f}"
            )
            key = name.replace(" ", "_")
            summary |= {key: float(values.mean()), f"{key}_ci95": float(half)}
    if metrics_out is not None:
        metrics_out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(metrics_out, json.dumps(summary, indent=2) + "\n")


app.add_typer(bench_app, name="bench")


def _run_config(checkpoint: Path):
    """The resolved config a checkpoint of ``metapeft train`` records; for a checkpoint
    written before checkpoints recorded it, its run's ``config.yaml``
    (``RUN/checkpoints/x`` -> ``RUN/config.yaml``)."""
    from metapeft import checkpoint as ckpt
    from metapeft.config import MetaLearningConfig

    recorded = ckpt.read_metadata(checkpoint).get("extra", {}).get("config")
    if recorded is not None:
        return MetaLearningConfig.from_dict(recorded)
    config_path = checkpoint.parent.parent / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{checkpoint}: the checkpoint records no config (an older metapeft wrote it) "
            f"and there is no {config_path} beside its run"
        )
    return MetaLearningConfig.from_yaml(config_path)


def _export_adapters(folder: Path, params, cfg) -> None:
    """The ``lora_a``/``lora_b`` leaves of ``params`` as an mlx-lm adapter folder, with
    the adapter settings of the run's config ``cfg``."""
    from mlx.utils import tree_flatten

    from metapeft import __version__
    from metapeft.lm import read_adapters, save_adapters

    lora = cfg.lm.lora if cfg.lm is not None else cfg.model.lora
    if lora is None:
        raise ValueError("its run has no LoRA adapters (model.lora is null); export it as npz")
    adapters = {k: v for k, v in tree_flatten(params) if k.endswith((".lora_a", ".lora_b"))}
    if not adapters:
        raise ValueError("no LoRA adapters (lora_a/lora_b) among the meta-parameters")
    if cfg.lm is not None and cfg.lm.base_adapters is not None:
        spec = read_adapters(cfg.lm.base_adapters)[1]
    else:
        spec = lora.spec()
    save_adapters(folder, adapters, spec, {"metapeft_version": __version__})


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by 'metapeft train'.")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="npz: the file (default: the checkpoint's name with .npz); "
            "mlx-lm: the folder (default: RUN/adapters).",
        ),
    ] = None,
    format: Annotated[
        str, typer.Option("--format", "-f", help="npz or mlx-lm.", case_sensitive=False)
    ] = "npz",
) -> None:
    """Export a checkpoint's meta-learned parameters.

    npz: every meta-learned parameter, flat names (layers.0.weight), loadable with
    model.load_weights(path, strict=False). mlx-lm: for a LoRA run, an adapter folder
    (adapters.safetensors with the lora_a/lora_b weights, adapter_config.json with
    rank, scale, dropout and target keys) as mlx-lm writes it. The checkpoint is
    verified (checksum, metapeft version) first.
    """
    from metapeft import checkpoint as ckpt

    format = format.lower()
    if format not in ("npz", "mlx-lm"):
        raise fail(f"unknown export format {format!r}; choose npz or mlx-lm")
    try:
        trees, _ = ckpt.load(checkpoint)
        params = trees["meta"]["params"]
        if format == "npz":
            target = output if output is not None else checkpoint.with_suffix(".npz")
            ckpt.save_npz(target, params)
        else:
            cfg = _run_config(checkpoint)
            target = output if output is not None else checkpoint.parent.parent / "adapters"
            try:
                _export_adapters(target, params, cfg)
            except ValueError as e:
                raise ValueError(f"{checkpoint}: {e}") from None
    except USER_ERRORS as e:
        raise fail(e) from None
    typer.echo(f"exported {checkpoint} -> {target}")


@app.command()
def plot(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by 'metapeft train'.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="The PNG; default RUN_DIR/loss.png.")
    ] = None,
) -> None:
    """Plot a run's support, query and validation losses per meta-step as a PNG."""
    from metapeft import plotting

    try:
        target = plotting.plot_losses(run_dir, output)
    except USER_ERRORS as e:
        raise fail(e) from None
    typer.echo(f"wrote {target}")


registry_app = typer.Typer(
    name="registry",
    help="Register, list and load named checkpoints (MLflow's registry when the config's "
    "tracking.backend is mlflow, else a local JSON index).",
    no_args_is_help=True,
)
app.add_typer(registry_app)

IndexOption = Annotated[Path, typer.Option(help="The local registry index (when not on MLflow).")]


def _registry(config: Path | None, profile: str | None, index: Path):
    from metapeft.registry import open_registry

    return open_registry(_load_config(config, profile, {}).tracking, index)


def _pairs(values: list[str] | None, what: str) -> dict[str, str]:
    pairs = {}
    for value in values or []:
        key, sep, text = value.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} {value!r}: expected KEY=VALUE")
        pairs[key] = text
    return pairs


@registry_app.command("register")
def registry_register(
    name: Annotated[str, typer.Argument(help="The model's name.")],
    checkpoint: Annotated[Path, typer.Argument(help="The checkpoint file to register.")],
    tag: Annotated[list[str] | None, typer.Option(help="KEY=VALUE; repeatable.")] = None,
    meta: Annotated[
        list[str] | None, typer.Option("--metadata", help="KEY=VALUE; repeatable.")
    ] = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    index: IndexOption = Path("runs/registry.json"),
) -> None:
    """Register a checkpoint as the next version of NAME (it is verified first)."""
    try:
        registry = _registry(config, profile, index)
        record = registry.register(
            name, checkpoint, metadata=_pairs(meta, "--metadata"), tags=_pairs(tag, "--tag")
        )
    except (*USER_ERRORS, KeyError) as e:
        raise fail(e) from None
    typer.echo(f"registered {record.name} version {record.version} -> {record.path}")


@registry_app.command("list")
def registry_list(
    name: Annotated[str | None, typer.Argument(help="Only this model.")] = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    index: IndexOption = Path("runs/registry.json"),
) -> None:
    """List registered models: name, version, path, tags, when."""
    from rich.console import Console
    from rich.table import Table

    try:
        registry = _registry(config, profile, index)
        records = [r for r in registry.list() if name is None or r.name == name]
    except (*USER_ERRORS, KeyError) as e:
        raise fail(e) from None
    table = Table(title=registry.where)
    for column in ("name", "version", "path", "tags", "created"):
        table.add_column(column, overflow="fold")
    for r in records:
        tags = ", ".join(f"{k}={v}" for k, v in sorted(r.tags.items()))
        table.add_row(r.name, str(r.version), r.path, tags, r.created)
    Console(width=200).print(table)


@registry_app.command("load")
def registry_load(
    name: Annotated[str, typer.Argument(help="The model's name.")],
    version: Annotated[int | None, typer.Option(help="Default: the latest.")] = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    index: IndexOption = Path("runs/registry.json"),
) -> None:
    """Load a registered checkpoint (verifying it) and print its record as JSON."""
    import json

    try:
        registry = _registry(config, profile, index)
        record = registry.get(name, version)
        registry.load(name, record.version)
    except (*USER_ERRORS, KeyError) as e:
        raise fail(e) from None
    typer.echo(json.dumps(record.to_dict(), indent=2))


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def toolkit(
    ctx: typer.Context,
    target: Annotated[
        str | None, typer.Argument(help="namespace:command, e.g. meta-learning-peft:info.")
    ] = None,
) -> None:
    """Run a command of any installed toolkit project as namespace:command [ARGS]...

    Projects are found through the 'efficientai_mlx_toolkit.projects' entry points;
    with no target (or --help), list them and their commands.
    """
    from metapeft import toolkit as tk

    try:
        if target is None or target in ("--help", "-h"):
            typer.echo("Usage: metapeft toolkit NAMESPACE:COMMAND [ARGS]...\n")
            typer.echo("Installed projects and their commands:")
            for namespace, commands in tk.describe():
                for name, help_text in commands:
                    typer.echo(f"  {f'{namespace}:{name}':<32} {help_text}")
            return
        tk.dispatch([target, *ctx.args], prog="metapeft toolkit")
    except tk.ToolkitError as e:
        raise fail(e) from None


@app.command("meta-train-lora")
def meta_train_lora(
    model: Annotated[str, typer.Option(help="mlx-lm model folder.")],
    tasks: Annotated[Path, typer.Option(help="JSONL: task and text, or prompt/completion.")],
    output_dir: Annotated[Path, typer.Option(help="Where the mlx-lm adapters are written.")],
    algorithm: Annotated[
        str | None, typer.Option(help="An algorithm of metapeft.learners.ALGORITHMS.")
    ] = None,
    rank: Annotated[int | None, typer.Option(help="LoRA rank.")] = None,
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha (scale = alpha/rank).")] = None,
    dropout: Annotated[float | None, typer.Option(help="LoRA dropout.")] = None,
    target_modules: Annotated[
        str | None, typer.Option(help="Comma-separated mlx-lm keys, e.g. self_attn.q_proj.")
    ] = None,
    num_layers: Annotated[
        int | None, typer.Option(help="Adapt the last N blocks (-1: all).")
    ] = None,
    base_adapters: Annotated[
        Path | None, typer.Option(help="mlx-lm adapter folder to start from.")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Meta-steps.")] = None,
    meta_batch_size: Annotated[int | None, typer.Option(help="Tasks per meta-step.")] = None,
    support_size: Annotated[int | None, typer.Option(help="Support examples per task.")] = None,
    query_size: Annotated[int | None, typer.Option(help="Query examples per task.")] = None,
    inner_lr: Annotated[float | None, typer.Option(help="Inner SGD step size.")] = None,
    inner_steps: Annotated[int | None, typer.Option(help="Inner SGD steps.")] = None,
    outer_lr: Annotated[float | None, typer.Option(help="Reptile epsilon or Adam rate.")] = None,
    max_seq_length: Annotated[int | None, typer.Option(help="Longer examples are cut.")] = None,
    grad_checkpoint: Annotated[
        bool, typer.Option(help="Recompute block activations (less memory).")
    ] = False,
    task_loop: Annotated[bool, typer.Option(help="Adapt tasks one at a time.")] = False,
    seed: Annotated[int | None, typer.Option(help="Seed of the init and sampler.")] = None,
    rank_timeout: Annotated[
        float | None,
        typer.Option(help="Under mlx.launch: seconds a rank waits for the others (30)."),
    ] = None,
) -> None:
    """Meta-learn a LoRA initialisation for an mlx-lm model; write it as mlx-lm adapters.

    A front-end to 'metapeft train' with an lm config section: OUTPUT_DIR is also the
    run folder (config.yaml, metrics.jsonl, checkpoints/). Under mlx.launch -n N, on N
    ranks, as 'metapeft train'."""
    from rich.console import Console

    from metapeft import training

    options = {
        "algorithm": algorithm,
        "rank": rank,
        "alpha": alpha,
        "dropout": dropout,
        "target_modules": target_modules.split(",") if target_modules else None,
        "num_layers": num_layers,
        "base_adapters": base_adapters,
        "steps": steps,
        "meta_batch_size": meta_batch_size,
        "support_size": support_size,
        "query_size": query_size,
        "inner_lr": inner_lr,
        "inner_steps": inner_steps,
        "outer_lr": outer_lr,
        "max_seq_length": max_seq_length,
        "seed": seed,
        "rank_timeout": rank_timeout,
    }
    try:
        world = _world(rank_timeout)
    except USER_ERRORS as e:
        raise fail(e) from None
    console = Console(quiet=world.rank != 0)  # rank 0 reports for all

    def on_step(step: int, m: dict[str, float]) -> None:
        console.print(
            f"step {step}: support {m['support_loss']:.4f}  query {m['query_loss']:.4f}  "
            f"({m['seconds']:.2f} s)",
            highlight=False,
        )

    try:
        summary = training.meta_train_lora(
            model,
            tasks,
            output_dir,
            grad_checkpoint=grad_checkpoint,
            task_loop=task_loop,
            on_step=on_step,
            **{k: v for k, v in options.items() if v is not None},
        )
    except (*USER_ERRORS, FloatingPointError) as e:
        raise _fail_on(world, e) from None
    console.print(
        f"{summary['steps']} meta-steps in {summary['seconds']:.1f} s; adapters in "
        f"{summary['output_dir']} (mlx_lm.load(model, adapter_path=...); "
        f"mlx_lm.lora -c {summary['output_dir']}/lora_config.yaml --train --data DATA)",
        highlight=False,
    )


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def serve(ctx: typer.Context) -> None:
    """Serve a model and many LoRA adapters over an OpenAI-compatible API, concurrent
    requests in one batch (options: metapeft serve --help)."""
    from metapeft.serve.cli import main as serve_main

    raise typer.Exit(serve_main(ctx.args))


@app.command("convert-gguf")
def convert_gguf(
    gguf: Annotated[Path, typer.Argument(help="The .gguf file (llama.cpp's format).")],
    out_dir: Annotated[Path, typer.Argument(help="The mlx-lm model folder to write.")],
    dtype: Annotated[
        str, typer.Option(help="float32, float16, bfloat16, or quantized (keep the file's).")
    ] = "float32",
) -> None:
    """Convert a GGUF model (Llama, Mistral, SmolLM, Qwen2) to an mlx-lm model folder."""
    from metapeft.lm.gguf import convert_gguf as convert

    try:
        folder = convert(gguf, out_dir, dtype)
    except (*USER_ERRORS, ImportError) as e:
        raise fail(e) from None
    typer.echo(f"wrote {folder} (mlx_lm.load, mlx_lm.generate and mlx_lm.lora take it)")


def main() -> None:
    app()
