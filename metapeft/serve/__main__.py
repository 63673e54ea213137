"""``python -m metapeft.serve``: see :func:`metapeft.serve.cli.main`."""

from metapeft.serve.cli import main

raise SystemExit(main())
