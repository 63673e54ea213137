"""One adapter concept: LoRALinear and QLoRALinear draw their adapters and fuse the
same way, apply_lora treats quantized layers as metapeft.lm.add_lora does, and
fuse_lora fuses both kinds."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from metapeft.nn import LoRALinear, LoRASpec, QLoRALinear, apply_lora, fuse_lora


def quantized(d_in=64, d_out=32, seed=0):
    mx.random.seed(seed)
    return nn.QuantizedLinear.from_linear(nn.Linear(d_in, d_out), group_size=32, bits=4)


def trained(layer, seed=1):
    """The layer with a non-zero adapter, so that fusing it changes the weight."""
    mx.random.seed(seed)
    layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
    return layer


def test_both_layers_draw_the_same_fresh_adapter():
    base, linear = quantized(), nn.Linear(64, 32)
    mx.random.seed(3)
    q = QLoRALinear.from_base(base, rank=4)
    mx.random.seed(3)
    f = LoRALinear.from_base(linear, rank=4)
    np.testing.assert_array_equal(np.array(q.lora_a), np.array(f.lora_a))
    assert not q.lora_b.any().item() and q.scale == f.scale == 4.0


def test_qlora_fuse_gives_the_same_map():
    layer = trained(QLoRALinear.from_base(quantized(), rank=4))
    x = mx.random.normal((5, 64))
    expected = layer(x)
    exact = layer.fuse(dequantize=True)
    assert type(exact) is nn.Linear
    np.testing.assert_allclose(np.array(exact(x)), np.array(expected), rtol=1e-4, atol=1e-4)
    again = layer.fuse()
    assert type(again) is nn.QuantizedLinear and (again.group_size, again.bits) == (32, 4)
    # Quantized again: within the rounding of 4-bit groups.
    scale = float(mx.abs(expected).max())
    np.testing.assert_allclose(np.array(again(x)), np.array(expected), atol=0.15 * scale)


def test_apply_lora_adapts_quantized_layers_and_fuse_lora_fuses_both():
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    model.layers[2] = quantized(64, 32)
    apply_lora(model, rank=2)
    assert isinstance(model.layers[0], LoRALinear) and isinstance(model.layers[2], QLoRALinear)
    assert sorted(k for k, _ in tree_flatten(model.trainable_parameters())) == [
        "layers.0.lora_a",
        "layers.0.lora_b",
        "layers.2.lora_a",
        "layers.2.lora_b",
    ]
    trained(model.layers[0]), trained(model.layers[2])
    x = mx.random.normal((3, 64))
    expected = model(x)
    fuse_lora(model, dequantize=True)
    assert type(model.layers[0]) is nn.Linear and type(model.layers[2]) is nn.Linear
    np.testing.assert_allclose(np.array(model(x)), np.array(expected), rtol=1e-4, atol=1e-4)


def test_fuse_needs_a_single_adapter():
    layer = LoRALinear.from_base(nn.Linear(8, 4), rank=2).with_tasks(3)
    with pytest.raises(ValueError, match="num_tasks=3"):
        layer.fuse()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": 0}, ValueError, "rank must be >= 1"),
        ({"rank": 2.5}, TypeError, "rank must be an int"),
        ({"alpha": float("nan")}, ValueError, "alpha must be finite"),
        ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\)"),
        ({"keys": ()}, ValueError, "keys must be non-empty"),
        ({"num_layers": 0}, ValueError, "num_layers must be >= 1 or -1"),
    ],
)
def test_the_one_spec_checks_every_setting(kwargs, error, match):
    with pytest.raises(error, match=match):
        LoRASpec(**kwargs)
    if set(kwargs) <= {"rank", "alpha", "dropout"}:
        with pytest.raises(error, match=match):
            QLoRALinear.from_base(quantized(), **kwargs)
        with pytest.raises(error, match=match):
            apply_lora(nn.Sequential(nn.Linear(4, 4)), **kwargs)
