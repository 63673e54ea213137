"""Meta-learned LoRA initialisations for language models, interoperable with mlx-lm.

- :func:`load_model`, :class:`LoRASpec`, :func:`add_lora`: an mlx-lm model with
  adapters where mlx-lm puts them (``num_layers``, ``lora_parameters["keys"]``);
  :class:`QLoRALinear` over 4-bit bases.
- :class:`TextTasks` and :func:`lm_loss`: tasks from JSONL, padded and masked.
- :func:`meta_train_lora`: Reptile, FOMAML or MAML over those tasks, exported as
  ``adapters.safetensors`` + ``adapter_config.json``.
- :class:`MetaLoRAAdapter`: a meta-learned initialisation to fine-tune from.
- :func:`checkpoint_blocks`: gradient checkpointing of the transformer blocks.
- :mod:`metapeft.lm.random_model`: small random models in mlx-lm's layout.

Needs the ``lm`` extra (``pip install "metapeft[lm]"``, which installs mlx-lm).

Example:
    >>> from metapeft.lm import meta_train_lora, MetaLoRAAdapter
    >>> meta_train_lora("tiny-llama", "tasks.jsonl", "meta-init", steps=10)
    >>> adapter = MetaLoRAAdapter.load("meta-init")
"""

from metapeft.learners import ALGORITHMS
from metapeft.lm.adapters import MetaLoRAAdapter, read_adapters, save_adapters
from metapeft.lm.data import IGNORE, TextTasks, lm_loss, read_jsonl
from metapeft.lm.memory import checkpoint_blocks
from metapeft.lm.model import LoRASpec, QLoRALinear, adapter_paths, add_lora, load_model
from metapeft.lm.train import build_learner, meta_train_lora

__all__ = [
    "ALGORITHMS",
    "IGNORE",
    "LoRASpec",
    "MetaLoRAAdapter",
    "QLoRALinear",
    "TextTasks",
    "adapter_paths",
    "add_lora",
    "build_learner",
    "checkpoint_blocks",
    "lm_loss",
    "load_model",
    "meta_train_lora",
    "read_adapters",
    "read_jsonl",
    "save_adapters",
]
