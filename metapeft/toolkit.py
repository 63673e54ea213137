"""A minimal toolkit dispatcher: projects found by entry point, commands as ``namespace:command``.

A project advertises its typer app (or click command) in the entry point group
``efficientai_mlx_toolkit.projects``; metapeft's own is
``meta-learning-peft = "metapeft.cli:app"``. :func:`dispatch` runs
``meta-learning-peft:info`` as ``metapeft info`` would, with the remaining
arguments passed on, and :func:`describe` lists the projects and their commands.

Example:
    >>> sorted(discover())  # doctest: +SKIP
    ['meta-learning-peft']
    >>> dispatch(["meta-learning-peft:info"])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import typer

GROUP = "efficientai_mlx_toolkit.projects"


class ToolkitError(ValueError):
    """A target that names no discovered project or command, or is malformed."""


def discover() -> dict[str, EntryPoint]:
    """The installed projects, by namespace (the entry point's name)."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def load(namespace: str) -> Any:
    """The click group of the project ``namespace`` (typer apps are converted).

    Raises:
        ToolkitError: If no installed project has that namespace, or it is not a
            typer app or click group.
    """
    projects = discover()
    if namespace not in projects:
        known = ", ".join(sorted(projects)) or "none"
        raise ToolkitError(f"no toolkit project {namespace!r}; installed projects: {known}")
    target = projects[namespace].load()
    command = typer.main.get_command(target) if isinstance(target, typer.Typer) else target
    # typer bundles its own click: a group is anything with named subcommands and main()
    if not isinstance(getattr(command, "commands", None), dict) or not callable(
        getattr(command, "main", None)
    ):
        raise ToolkitError(
            f"toolkit project {namespace!r} ({projects[namespace].value}) is not a typer app "
            f"or click group, got {type(target).__name__}"
        )
    return command


def split_target(target: str) -> tuple[str, str]:
    """``"meta-learning-peft:info"`` -> ``("meta-learning-peft", "info")``.

    Raises:
        ToolkitError: Unless ``target`` is ``namespace:command`` with both parts given.
    """
    namespace, sep, command = target.partition(":")
    if not sep or not namespace or not command:
        raise ToolkitError(f"expected namespace:command, got {target!r}")
    return namespace, command


def dispatch(argv: Sequence[str], prog: str = "toolkit") -> Any:
    """Runs ``namespace:command [ARGS...]``; returns what the command returns.

    Click's own exits (``--help``, usage errors, ``typer.Exit``) propagate as
    ``SystemExit``, as when the project's command line runs on its own.

    Raises:
        ToolkitError: If the target is malformed or names no project or command.
    """
    if not argv:
        raise ToolkitError("expected namespace:command")
    namespace, name = split_target(argv[0])
    group = load(namespace)
    if name not in group.commands:
        known = ", ".join(sorted(group.commands))
        raise ToolkitError(f"project {namespace!r} has no command {name!r}; its commands: {known}")
    command = group.commands[name]
    return command.main(args=list(argv[1:]), prog_name=f"{prog} {namespace}:{name}")


def describe() -> list[tuple[str, list[tuple[str, str]]]]:
    """Each installed project's namespace with its commands' names and one-line help."""
    found = []
    for namespace in sorted(discover()):
        group = load(namespace)
        commands = [
            (name, command.get_short_help_str(limit=70))
            for name, command in sorted(group.commands.items())
        ]
        found.append((namespace, commands))
    return found
