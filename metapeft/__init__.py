"""metapeft: meta-learning parameter-efficient fine-tuning on MLX."""

import mlx.core  # noqa: F401  (loads libmlx before the extension)

from metapeft import ops, reference

__version__ = "0.1.0"

__all__ = ["ops", "reference", "__version__"]
