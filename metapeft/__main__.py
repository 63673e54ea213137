"""``python -m metapeft``: the command line (see :mod:`metapeft.cli`)."""

from metapeft.cli import main

main()
