"""How the command lines report an expected error: one red line on stderr, exit 1."""

from __future__ import annotations

import typer


def fail(message: str | BaseException) -> typer.Exit:
    """The ``typer.Exit`` to raise after printing ``message`` as one error line.

    Example:
        >>> raise fail("no such checkpoint")  # doctest: +SKIP
    """
    from rich.console import Console
    from rich.text import Text

    if isinstance(message, KeyError):  # str() of a KeyError is its repr
        message = str(message.args[0])
    # One write: the lines of several ranks (mlx.launch) interleave by writes.
    line = Text.assemble(("error:", "bold red"), " ", str(message))
    Console(stderr=True).print(line, highlight=False, soft_wrap=True)
    return typer.Exit(code=1)
