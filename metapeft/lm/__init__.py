"""Meta-learned LoRA initialisations for language models, interoperable with mlx-lm.

- :func:`load_model`, :class:`LoRASpec`, :func:`add_lora`: an mlx-lm model with
  adapters where mlx-lm puts them (``num_layers``, ``lora_parameters["keys"]``);
  :class:`QLoRALinear` over 4-bit bases.
- :class:`TextTasks` and :func:`lm_loss`: tasks from JSONL, padded and masked;
  :func:`trainer_loss`, mlx-lm's trainer loss on the same fused path.
- :func:`build_learner`: any registered algorithm over those tasks;
  :func:`export_adapters` writes the result as ``adapters.safetensors`` +
  ``adapter_config.json`` (a run with an ``lm`` config section, or
  :func:`metapeft.training.meta_train_lora`, does both).
- :class:`MetaLoRAAdapter`: a meta-learned initialisation to fine-tune from.
- :func:`checkpoint_blocks`: gradient checkpointing of the transformer blocks.
- :mod:`metapeft.lm.random_model`: small random models in mlx-lm's layout.

Needs the ``lm`` extra (``pip install "metapeft[lm]"``, which installs mlx-lm).

Example:
    >>> from metapeft.lm import MetaLoRAAdapter
    >>> from metapeft.training import meta_train_lora
    >>> meta_train_lora("tiny-llama", "tasks.jsonl", "meta-init", steps=10)
    >>> adapter = MetaLoRAAdapter.load("meta-init")
"""

from metapeft.learners import ALGORITHMS
from metapeft.lm.adapters import MetaLoRAAdapter, read_adapters, save_adapters
from metapeft.lm.data import IGNORE, TextTasks, lm_loss, read_jsonl, trainer_loss
from metapeft.lm.memory import checkpoint_blocks
from metapeft.lm.model import adapter_paths, add_lora, is_quantized, load_model
from metapeft.lm.train import build_learner, export_adapters
from metapeft.nn.lora import LoRASpec, QLoRALinear

__all__ = [
    "ALGORITHMS",
    "IGNORE",
    "LoRASpec",
    "MetaLoRAAdapter",
    "QLoRALinear",
    "TextTasks",
    "adapter_paths",
    "add_lora",
    "is_quantized",
    "build_learner",
    "export_adapters",
    "checkpoint_blocks",
    "lm_loss",
    "load_model",
    "read_adapters",
    "read_jsonl",
    "save_adapters",
    "trainer_loss",
]
