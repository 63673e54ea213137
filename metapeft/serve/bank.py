"""Adapter slots over one model: every loaded adapter sits in one stacked bank per
adapted layer, so that each row of a batch runs its own adapter.

A :class:`BankedLinear` replaces a ``Linear`` (or ``QuantizedLinear``) of the model the
first time an adapter touches it. It holds ``lora_a (slots, d_in, R)`` and
``lora_b (slots, R, d_out)``, where ``R`` is ``max_rank``: an adapter of rank ``r``
fills the first ``r`` columns of its slot and the rest stay zero, and its scale is
folded into ``lora_b``. Slot 0 is the base model (all zeros). Before each forward
pass, :meth:`AdapterBank.use` says which slot each row takes; the layers gather their
rows' adapters and call :func:`metapeft.ops.lora_linear` once, with one adapter per row.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from metapeft import ops
from metapeft.lm.adapters import read_adapters
from metapeft.nn.fast import quantized_product

__all__ = ["Adapter", "AdapterBank", "BankedLinear"]


@dataclass
class Adapter:
    """A loaded adapter: its name, folder and slot, and how many requests hold it."""

    name: str
    path: Path
    slot: int
    users: int = 0
    unloaded: bool = False


@dataclass
class _Rows:
    """The slot of each row of the next forward pass; ``same`` is that slot when every
    row shares one (then the layers skip the gather)."""

    slots: mx.array = field(default_factory=lambda: mx.array([0]))
    same: int | None = 0


class BankedLinear(nn.Module):
    """A frozen linear layer (float or MLX-quantized) plus one adapter per slot.

    Args:
        base: The ``nn.Linear`` (or subclass) or ``nn.QuantizedLinear`` to wrap; its
            arrays are shared.
        rows: The bank's row table, read at every call.
        slots: Number of slots, slot 0 (the base model) included.
        rank: The bank's rank ``R``.

    Example:
        >>> bank = AdapterBank(model, max_loras=2, max_rank=8)
        >>> bank.load("a", "adapters/a")   # wraps the modules adapter "a" adapts
    """

    def __init__(self, base: nn.Module, rows: _Rows, slots: int, rank: int) -> None:
        super().__init__()
        for key in ("weight", "bias", "scales", "biases"):
            if key in base:
                self[key] = base[key]
        if "scales" in base:
            self.group_size, self.bits, self.mode = base.group_size, base.bits, base.mode
        d_out, d_in = _dims(base)
        self.lora_a = mx.zeros((slots, d_in, rank))
        self.lora_b = mx.zeros((slots, rank, d_out))
        self.rows = rows
        self.freeze()

    @property
    def dims(self) -> tuple[int, int]:
        """``(d_out, d_in)``."""
        return self["lora_b"].shape[-1], self["lora_a"].shape[1]

    def _base(self, x: mx.array) -> mx.array:
        if "scales" in self:
            return quantized_product(self, x)
        return ops.linear(x, self["weight"], self.get("bias"))

    def __call__(self, x: mx.array) -> mx.array:
        same = self.rows.same
        if same == 0:
            return self._base(x)
        if same is not None:
            lora_a, lora_b = self["lora_a"][same], self["lora_b"][same]
        else:  # x is (B, ..., d_in): row i takes its slot's adapter
            lora_a = mx.take(self["lora_a"], self.rows.slots, axis=0)
            lora_b = mx.take(self["lora_b"], self.rows.slots, axis=0)
        if "scales" in self:
            out = quantized_product(self, x)
            low = ops.linear(x, mx.swapaxes(lora_a, -1, -2))
            low = ops.linear(low, mx.swapaxes(lora_b, -1, -2))
            return out + low.astype(out.dtype)
        weight, bias = self["weight"], self.get("bias")
        out = ops.lora_linear(x, weight, lora_a, lora_b, 1.0, bias)
        dtype = mx.result_type(*(a for a in (x, weight, bias) if a is not None))
        return out if out.dtype == dtype else out.astype(dtype)


def _dims(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a float or quantized linear layer."""
    if isinstance(module, BankedLinear):
        return module.dims
    if "scales" in module:
        return module["scales"].shape[0], module["weight"].shape[1] * 32 // module.bits
    d_out, d_in = module["weight"].shape
    return d_out, d_in


class AdapterBank:
    """The adapters a server holds, by name, each in a slot of every adapted layer.

    Loading writes arrays and swaps modules, so :meth:`load` and the forward passes
    run on one thread (the engine's); :meth:`acquire`, :meth:`release` and
    :meth:`unload` only keep the books and may run anywhere. An unloaded adapter's slot
    is reused once the last request holding it has finished.

    Args:
        model: An mlx-lm model (its Linear layers get wrapped on demand).
        max_loras: Slots for adapters (slot 0, the base model, comes on top).
        max_rank: The largest adapter rank accepted; every slot is padded to it.

    Example:
        >>> bank = AdapterBank(model, max_loras=4, max_rank=16)
        >>> bank.load("support", "adapters/support")
        >>> bank.use([0, bank.acquire("support").slot])   # row 0 base, row 1 "support"
    """

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int) -> None:
        if max_loras < 1 or max_rank < 1:
            raise ValueError(f"max_loras and max_rank must be >= 1, got {max_loras}, {max_rank}")
        self.model = model
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.rows = _Rows()
        self._adapters: dict[str, Adapter] = {}
        self._free = list(range(1, max_loras + 1))
        self._lock = threading.Lock()

    def adapters(self) -> list[Adapter]:
        """The adapters requests can use, in the order they were loaded."""
        with self._lock:
            return list(self._adapters.values())

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._adapters

    def load(self, name: str, folder: str | Path) -> Adapter:
        """Reads an mlx-lm adapter folder (safetensors only) into a free slot.

        Raises:
            FileNotFoundError: If the folder or one of its files is missing.
            ValueError: Naming the folder, if the name is taken, no slot is free, the
                rank is above ``max_rank``, or the weights do not fit this model
                (another base model, modules it does not have).
        """
        folder = Path(folder)
        weights, spec, _ = read_adapters(folder)
        if spec.rank > self.max_rank:
            raise ValueError(
                f"{folder}: adapter rank {spec.rank} is above the server's maximum "
                f"{self.max_rank} (--max-lora-rank)"
            )
        pairs = self._check(folder, weights, spec.rank)
        with self._lock:
            if name in self._adapters:
                raise ValueError(f"an adapter named {name!r} is already loaded")
            if not self._free:
                raise ValueError(
                    f"all {self.max_loras} adapter slots are in use (--max-loras); "
                    "unload an adapter first"
                )
            slot = self._free.pop(0)
        try:
            self._write(slot, pairs, spec.scale)
        except BaseException:
            with self._lock:
                self._free.insert(0, slot)
            raise
        adapter = Adapter(name, folder, slot)
        with self._lock:
            self._adapters[name] = adapter
        return adapter

    def _check(
        self, folder: Path, weights: dict[str, mx.array], rank: int
    ) -> dict[str, tuple[mx.array, mx.array]]:
        """``{module path: (lora_a, lora_b)}`` after checking that every pair fits a
        linear layer of the model."""
        by_module: dict[str, dict[str, mx.array]] = {}
        for key, value in weights.items():
            path, _, kind = key.rpartition(".")
            if kind not in ("lora_a", "lora_b"):
                raise ValueError(f"{folder}: {key} is not a LoRA weight (lora_a or lora_b)")
            by_module.setdefault(path, {})[kind] = value
        modules = dict(self.model.named_modules())
        problems = []
        for path, pair in sorted(by_module.items()):
            module = modules.get(path)
            if module is None:
                problems.append(f"{path}: no such module in the model")
            elif not isinstance(module, (nn.Linear, nn.QuantizedLinear, BankedLinear)):
                problems.append(f"{path}: a {type(module).__name__}, not a linear layer")
            elif set(pair) != {"lora_a", "lora_b"}:
                problems.append(f"{path}: lora_a or lora_b is missing")
            else:
                d_out, d_in = _dims(module)
                want = {"lora_a": (d_in, rank), "lora_b": (rank, d_out)}
                for kind, shape in want.items():
                    if tuple(pair[kind].shape) != shape:
                        problems.append(
                            f"{path}.{kind}: shape {tuple(pair[kind].shape)}, the model's "
                            f"layer takes {shape} at rank {rank}"
                        )
        if problems:
            more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
            raise ValueError(
                f"{folder}: the adapter does not fit this model (another base model?): "
                + "; ".join(problems[:4])
                + more
            )
        return {path: (pair["lora_a"], pair["lora_b"]) for path, pair in by_module.items()}

    def _write(self, slot: int, pairs: dict[str, tuple[mx.array, mx.array]], scale: float) -> None:
        """Wraps the modules not yet banked, then writes the slot of every banked layer:
        the adapter where it has one, zeros elsewhere."""
        modules = dict(self.model.named_modules())
        new = [
            (path, BankedLinear(modules[path], self.rows, self.max_loras + 1, self.max_rank))
            for path in pairs
            if not isinstance(modules[path], BankedLinear)
        ]
        if new:
            self.model.update_modules(tree_unflatten(new))
        banked = [(p, m) for p, m in self.model.named_modules() if isinstance(m, BankedLinear)]
        for path, layer in banked:
            lora_a = mx.zeros(layer["lora_a"].shape[1:])
            lora_b = mx.zeros(layer["lora_b"].shape[1:])
            if path in pairs:
                a, b = pairs[path]
                r = a.shape[1]
                lora_a[:, :r] = a.astype(mx.float32)
                lora_b[:r, :] = scale * b.astype(mx.float32)
            layer["lora_a"][slot] = lora_a
            layer["lora_b"][slot] = lora_b
        mx.eval([(layer["lora_a"], layer["lora_b"]) for _, layer in banked])

    def acquire(self, name: str) -> Adapter:
        """The adapter named ``name``, held until :meth:`release`.

        Raises:
            KeyError: If no adapter of that name is loaded.
        """
        with self._lock:
            adapter = self._adapters[name]
            adapter.users += 1
            return adapter

    def release(self, adapter: Adapter) -> None:
        """Lets go of an adapter from :meth:`acquire`."""
        with self._lock:
            adapter.users -= 1
            if adapter.unloaded and adapter.users == 0:
                self._free.append(adapter.slot)

    def unload(self, name: str) -> None:
        """Takes the adapter out of service: new requests cannot use it, and its slot
        is free once the requests holding it have finished.

        Raises:
            KeyError: If no adapter of that name is loaded.
        """
        with self._lock:
            adapter = self._adapters.pop(name)
            adapter.unloaded = True
            if adapter.users == 0:
                self._free.append(adapter.slot)

    def use(self, slots: list[int]) -> None:
        """Sets the slot of each row for the next forward pass (0: the base model)."""
        first = slots[0]
        self.rows.same = first if all(s == first for s in slots) else None
        self.rows.slots = mx.array(slots)
