"""How the command lines report an expected error: one red line on stderr, exit 1."""

from __future__ import annotations

import typer


def fail(message: str | BaseException) -> typer.Exit:
    """The ``typer.Exit`` to raise after printing ``message`` as one error line.

    Example:
        >>> raise fail("no such checkpoint")  # doctest: +SKIP
    """
    from rich.console import Console

    if isinstance(message, KeyError):  # str() of a KeyError is its repr
        message = str(message.args[0])
    console = Console(stderr=True)
    console.print("[bold red]error:[/] ", end="")
    console.print(str(message), highlight=False, markup=False, soft_wrap=True)
    return typer.Exit(code=1)
