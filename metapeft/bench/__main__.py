"""``python -m metapeft.bench``: the same as ``metapeft bench``."""

from metapeft.bench.cli import app

app(prog_name="python -m metapeft.bench")
