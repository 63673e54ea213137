"""metapeft.nn: LoRALinear (single and per-task), BLASLinear, apply_lora, fuse_lora.

Layer outputs and gradients are compared with the pure-MLX formula of
:func:`metapeft.reference.lora_linear`; the per-task form with a loop over tasks and
with ``mx.vmap`` of the single form; and, when mlx-lm is installed, with mlx-lm's
own LoRA layers.
"""

import importlib.util

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from conftest import DTYPES, assert_close, dtype_name, rand, tol
from metapeft import reference as ref
from metapeft.nn import BLASLinear, LoRALinear, apply_lora, fuse_lora, use_blas_linear

D_IN, D_OUT, RANK, T = 24, 10, 4, 3
ALPHA = 6.0
BIAS = [True, False]
HAS_MLX_LM = importlib.util.find_spec("mlx_lm") is not None


def keys(tree):
    return sorted(k for k, _ in tree_flatten(tree))


def base_linear(rng, dtype, bias=True, d_in=D_IN, d_out=D_OUT):
    linear = nn.Linear(d_in, d_out, bias=bias)
    linear.update(tree_map(lambda a: rand(rng, a.shape, dtype), linear.parameters()))
    return linear


def lora_layer(rng, dtype, bias=True, **kwargs):
    """A LoRALinear on a random base of ``dtype`` with a random (nonzero) float32 adapter."""
    layer = LoRALinear.from_base(base_linear(rng, dtype, bias), rank=RANK, alpha=ALPHA, **kwargs)
    layer.update({"lora_b": rand(rng, (RANK, D_OUT))})
    return layer


def per_task_adapters(rng, num_tasks=T):
    return {
        "lora_a": rand(rng, (num_tasks, D_IN, RANK)),
        "lora_b": rand(rng, (num_tasks, RANK, D_OUT)),
    }


def out_dtype(x, layer):
    return mx.result_type(x, *(layer[k] for k in ("weight", "bias") if k in layer))


def reference(layer, x):
    """The layer's map written with metapeft.reference, rounded to nn.Linear's dtype."""
    out = ref.lora_linear(
        x, layer.weight, layer.lora_a, layer.lora_b, layer.scale, layer.get("bias")
    )
    return out.astype(out_dtype(x, layer))


def call_with(module, params, *args):
    """``module(*args)`` with ``params`` swapped in, then the module restored (a pure
    function of ``params``, safe under vmap and grad)."""
    saved = module.parameters()
    module.update(params)
    try:
        return module(*args)
    finally:
        module.update(saved)


def task(tree, t):
    """Task ``t`` of a tree whose leaves carry a leading task axis."""
    return tree_map(lambda a: a[t], tree)


def dot(out, cot):
    return mx.sum(out.astype(mx.float32) * cot)


# --------------------------------------------------------------------------- LoRALinear


@pytest.mark.parametrize("bias", BIAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_fresh_adapter_is_base(dtype, bias):
    rng = np.random.default_rng(0)
    base = base_linear(rng, dtype, bias)
    layer = LoRALinear.from_base(base, rank=RANK, alpha=ALPHA)
    x = rand(rng, (2, 5, D_IN), dtype)
    out = layer(x)
    assert out.dtype == dtype
    assert mx.array_equal(out, BLASLinear.from_linear(base)(x))
    assert mx.array_equal(layer.with_tasks(2)(x[:2]), BLASLinear.from_linear(base)(x[:2]))
    assert_close(out, base(x), dtype, k=D_IN)  # stock MLX matmul: equal up to rounding
    assert layer.lora_a.dtype == mx.float32 and layer.lora_b.dtype == mx.float32
    bound = 1 / np.sqrt(D_IN)
    assert mx.all(mx.abs(layer.lora_a) <= bound).item() and mx.all(layer.lora_b == 0).item()

    layer.lora_b = layer.lora_b.at[0, 0].add(1.0)
    assert not mx.array_equal(layer(x), BLASLinear.from_linear(base)(x))


def test_constructor_and_from_base():
    layer = LoRALinear(D_IN, D_OUT, rank=RANK, alpha=ALPHA, dropout=0.1)
    assert (layer.weight.shape, layer.bias.shape) == ((D_OUT, D_IN), (D_OUT,))
    assert (layer.lora_a.shape, layer.lora_b.shape) == ((D_IN, RANK), (RANK, D_OUT))
    assert (layer.input_dims, layer.output_dims, layer.rank, layer.num_tasks) == (
        D_IN,
        D_OUT,
        RANK,
        None,
    )
    assert layer.scale == ALPHA / RANK
    assert keys(layer.trainable_parameters()) == ["lora_a", "lora_b"]
    assert keys(layer.parameters()) == ["bias", "lora_a", "lora_b", "weight"]
    assert "rank=4" in repr(layer) and "Dropout(p=0.0999" in repr(layer)

    base = nn.Linear(D_IN, D_OUT, bias=False)
    base.eval()
    layer = LoRALinear.from_base(base)
    assert layer.weight is base.weight and "bias" not in layer
    assert (layer.rank, layer.scale, layer.training) == (8, 2.0, False)
    assert keys(layer.trainable_parameters()) == ["lora_a", "lora_b"]
    assert base.trainable_parameters()["weight"] is base.weight  # the base is not touched

    mx.random.seed(7)
    a1 = LoRALinear.from_base(base).lora_a
    mx.random.seed(7)
    assert mx.array_equal(a1, LoRALinear.from_base(base).lora_a)


@pytest.mark.parametrize(
    ("kwargs", "exc", "name"),
    [
        ({"rank": 0}, ValueError, "rank"),
        ({"rank": 2.0}, TypeError, "rank"),
        ({"alpha": 0.0}, ValueError, "alpha"),
        ({"alpha": float("inf")}, ValueError, "alpha"),
        ({"dropout": 1.0}, ValueError, "dropout"),
        ({"dropout": -0.1}, ValueError, "dropout"),
    ],
)
def test_bad_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        LoRALinear.from_base(nn.Linear(4, 2), **kwargs)
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(exc, match=name):
        apply_lora(model, **kwargs)
    assert type(model.layers[0]) is nn.Linear and keys(model.trainable_parameters())


def test_from_base_rejects_non_linear():
    with pytest.raises(TypeError, match="dequantize"):
        LoRALinear.from_base(nn.QuantizedLinear(64, 8))
    with pytest.raises(TypeError, match="Embedding"):
        LoRALinear.from_base(nn.Embedding(4, 2))


@pytest.mark.parametrize("bias", BIAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("per_task", [False, True], ids=["single", "per_task"])
def test_output_and_grads_vs_reference(dtype, bias, per_task):
    rng = np.random.default_rng(1)
    layer = lora_layer(rng, dtype, bias)
    x = rand(rng, (2, 5, D_IN), dtype)
    if per_task:
        layer = layer.with_tasks(T)
        layer.update(per_task_adapters(rng))
        x = rand(rng, (T, 2, 5, D_IN), dtype)
    out = layer(x)
    assert_close(out, reference(layer, x), out_dtype(x, layer), k=D_IN)

    params = layer.trainable_parameters()
    cot = rand(rng, out.shape)

    def loss(p, x_):
        return dot(call_with(layer, p, x_), cot)

    def ref_loss(p, x_):
        return dot(
            ref.lora_linear(
                x_, layer.weight, p["lora_a"], p["lora_b"], layer.scale, layer.get("bias")
            ).astype(out.dtype),
            cot,
        )

    (val, (g_p, g_x)) = mx.value_and_grad(loss, argnums=(0, 1))(params, x)
    (r_val, (r_p, r_x)) = mx.value_and_grad(ref_loss, argnums=(0, 1))(params, x)
    k = D_IN + D_OUT
    assert_close(val, r_val, mx.float32, k=k, rtol=tol(dtype, k), label="loss")
    assert_close(g_x, r_x, dtype, k=k, label="grad x")
    for name in ("lora_a", "lora_b"):
        assert_close(
            g_p[name], r_p[name], mx.float32, k=k, rtol=tol(dtype, k), label=f"grad {name}"
        )


def test_nn_value_and_grad_sees_only_adapters():
    rng = np.random.default_rng(2)
    layer = lora_layer(rng, mx.float32)
    x = rand(rng, (6, D_IN))
    _, grads = nn.value_and_grad(layer, lambda x_: mx.sum(layer(x_) ** 2))(x)
    assert keys(grads) == ["lora_a", "lora_b"]
    assert mx.any(grads["lora_a"] != 0).item() and mx.any(grads["lora_b"] != 0).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_per_task_equals_loop_and_vmap(dtype):
    rng = np.random.default_rng(3)
    single = lora_layer(rng, dtype)
    tasks = single.with_tasks(T)
    adapters = per_task_adapters(rng)
    tasks.update(adapters)
    x = rand(rng, (T, 4, D_IN), dtype)
    got = tasks(x)
    assert got.shape == (T, 4, D_OUT) and got.dtype == dtype

    looped = mx.stack([call_with(single, task(adapters, t), x[t]) for t in range(T)])
    assert_close(got, looped, dtype, k=D_IN, label="per-task vs loop")
    vmapped = mx.vmap(lambda p, x_: call_with(single, p, x_))(adapters, x)
    assert_close(got, vmapped, dtype, k=D_IN, label="per-task vs vmap")
    assert_close(got, reference(tasks, x), dtype, k=D_IN, label="per-task vs reference")

    # Gradients of a per-task loss, with respect to the per-task adapters, agree too.
    cot = rand(rng, got.shape)
    g_tasks = mx.grad(lambda p: dot(call_with(tasks, p, x), cot))(adapters)
    g_vmap = mx.grad(lambda p: dot(mx.vmap(lambda q, x_: call_with(single, q, x_))(p, x), cot))(
        adapters
    )
    for name in ("lora_a", "lora_b"):
        assert_close(
            g_tasks[name],
            g_vmap[name],
            mx.float32,
            k=D_IN,
            rtol=tol(dtype, D_IN),
            label=f"grad {name}",
        )


def test_with_tasks_copy():
    rng = np.random.default_rng(4)
    layer = lora_layer(rng, mx.float16, dropout=0.25)
    layer.eval()
    tasks = layer.with_tasks(T)
    assert tasks is not layer and tasks.num_tasks == T and "num_tasks=3" in repr(tasks)
    assert tasks.weight is layer.weight and tasks.bias is layer.bias
    assert tasks.lora_a.shape == (T, D_IN, RANK) and tasks.lora_b.shape == (T, RANK, D_OUT)
    assert all(mx.array_equal(tasks.lora_a[t], layer.lora_a) for t in range(T))
    assert keys(tasks.trainable_parameters()) == ["lora_a", "lora_b"]
    assert not tasks.training and not tasks.dropout.training and tasks.scale == layer.scale
    tasks.train()
    assert not layer.training and not layer.dropout.training  # state is not shared
    assert layer.lora_a.ndim == 2
    with pytest.raises(ValueError, match="already per task"):
        tasks.with_tasks(2)
    with pytest.raises(ValueError, match="num_tasks"):
        layer.with_tasks(0)
    with pytest.raises(ValueError, match="num_tasks=3"):
        tasks.fuse()


@pytest.mark.parametrize("per_task", [False, True], ids=["single", "per_task"])
def test_dropout(per_task):
    rng = np.random.default_rng(5)
    p = 0.5
    layer = lora_layer(rng, mx.float32, dropout=p)
    x = rand(rng, (4, 6, D_IN))
    if per_task:
        layer = layer.with_tasks(4)
        # a per-task bias with the weight shared by the tasks
        layer.update({**per_task_adapters(rng, 4), "bias": rand(rng, (4, D_OUT))})
    mx.random.seed(11)
    out = layer(x)
    mx.random.seed(11)
    dropped = nn.Dropout(p)(x)  # the same draw as the layer's
    assert not mx.array_equal(dropped, x)
    bias = layer.bias if layer.bias.ndim == 1 else layer.bias[:, None, :]
    base = ref.linear(x, layer.weight) + bias
    zero = mx.zeros_like(layer.weight)

    def expected(p_):
        low = ref.lora_linear(dropped, zero, p_["lora_a"], p_["lora_b"], layer.scale)
        return base + low

    assert_close(out, expected(layer.trainable_parameters()), mx.float32, k=D_IN)

    cot = rand(rng, out.shape)
    params = layer.trainable_parameters()
    mx.random.seed(11)
    grads = mx.grad(lambda p_: dot(call_with(layer, p_, x), cot))(params)
    ref_grads = mx.grad(lambda p_: dot(expected(p_), cot))(params)
    for name in ("lora_a", "lora_b"):
        assert_close(grads[name], ref_grads[name], mx.float32, k=D_IN, label=f"grad {name}")

    layer.eval()
    evaluated = layer(x)
    assert_close(evaluated, reference(layer, x), mx.float32, k=D_IN)
    assert mx.array_equal(evaluated, layer(x))


@pytest.mark.parametrize("bias", BIAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_fuse_equals_unfused(dtype, bias):
    rng = np.random.default_rng(7)
    layer = lora_layer(rng, dtype, bias)
    x = rand(rng, (3, D_IN), dtype)
    fused = layer.fuse()
    assert type(fused) is nn.Linear
    assert fused.weight.dtype == dtype and fused.weight.shape == (D_OUT, D_IN)
    assert ("bias" in fused) == bias
    assert keys(fused.trainable_parameters()) == []  # frozen, as the base was
    delta = layer.scale * (layer.lora_a @ layer.lora_b).T
    assert_close(fused.weight, layer.weight.astype(mx.float32) + delta, dtype, k=RANK)
    # The fused layer rounds its weight to dtype, so compare at twice the tolerance.
    assert_close(fused(x), layer(x), dtype, k=D_IN, rtol=2 * tol(dtype, D_IN))


def test_compile():
    rng = np.random.default_rng(8)
    layer = lora_layer(rng, mx.float32)
    x = rand(rng, (5, D_IN))
    params = layer.trainable_parameters()

    def loss(p):
        return mx.sum(call_with(layer, p, x) ** 2)

    assert_close(mx.compile(lambda p: call_with(layer, p, x))(params), layer(x), mx.float32)
    g, cg = mx.grad(loss)(params), mx.compile(mx.grad(loss))(params)
    for name in ("lora_a", "lora_b"):
        assert_close(cg[name], g[name], mx.float32, k=D_IN)


# --------------------------------------------------------------------------- BLASLinear


class CustomLinear(nn.Linear):
    def __call__(self, x):
        return super().__call__(x) * 2


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        shared = nn.Linear(8, 8)
        self.layers = [nn.Linear(8, 8), shared, nn.Linear(8, 8, bias=False)]
        self.tied = shared
        self.custom = CustomLinear(8, 8)
        self.norm = nn.LayerNorm(8)

    def __call__(self, x):
        for layer in self.layers:
            x = nn.relu(layer(x))
        return self.custom(self.norm(self.tied(x)))


def test_use_blas_linear_preserves_everything():
    rng = np.random.default_rng(9)
    net = Net()
    net.layers[2].set_dtype(mx.bfloat16)
    net.layers[0].freeze(keys=["bias"])
    net.layers[2].eval()
    x = rand(rng, (5, 8))
    before = net(x)
    params = dict(tree_flatten(net.parameters()))
    trainable = keys(net.trainable_parameters())
    training = [m.training for m in net.modules()]

    assert use_blas_linear(net) is net
    assert [type(m) for m in net.layers] == [BLASLinear] * 3
    assert net.tied is net.layers[1]  # a shared layer stays shared
    assert type(net.custom) is CustomLinear  # subclasses keep their own __call__
    after = dict(tree_flatten(net.parameters()))
    assert after.keys() == params.keys() and all(after[k] is params[k] for k in params)
    assert keys(net.trainable_parameters()) == trainable
    assert [m.training for m in net.modules()] == training
    assert net.layers[2].weight.dtype == mx.bfloat16
    assert_close(net(x), before, mx.float32, k=8, rtol=tol(mx.bfloat16, 8))
    assert isinstance(net.layers[0], nn.Linear)

    root = use_blas_linear(nn.Linear(8, 4))
    assert type(root) is BLASLinear


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_blas_linear_matches_linear_and_vmap(dtype):
    rng = np.random.default_rng(10)
    base = base_linear(rng, dtype)
    fast = BLASLinear.from_linear(base)
    x = rand(rng, (2, 3, D_IN), dtype)
    assert_close(fast(x), base(x), dtype, k=D_IN)
    weights = {"weight": rand(rng, (T, D_OUT, D_IN), dtype), "bias": rand(rng, (T, D_OUT), dtype)}
    xt = rand(rng, (T, 4, D_IN), dtype)
    per_task = call_with(fast, weights, xt)
    vmapped = mx.vmap(lambda p, x_: call_with(fast, p, x_))(weights, xt)
    looped = mx.stack([call_with(base, task(weights, t), xt[t]) for t in range(T)])
    assert_close(per_task, looped, dtype, k=D_IN)
    assert_close(vmapped, looped, dtype, k=D_IN)


# --------------------------------------------------------------------------- apply_lora


class MLP(nn.Module):
    def __init__(self, dims=(8, 16, 16, 4)):
        super().__init__()
        self.layers = [nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)]

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = nn.relu(layer(x))
        return self.layers[-1](x)


class Attention(nn.Module):
    def __init__(self, dims=16, heads=2):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dims, dims, bias=False)
        self.k_proj = nn.Linear(dims, dims, bias=False)
        self.v_proj = nn.Linear(dims, dims, bias=False)
        self.o_proj = nn.Linear(dims, dims, bias=False)

    def __call__(self, x):
        *lead, length, dims = x.shape

        def split(t):
            return t.reshape(*lead, length, self.heads, -1).swapaxes(-2, -3)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        scores = (q @ k.swapaxes(-1, -2)) * q.shape[-1] ** -0.5
        out = mx.softmax(scores, axis=-1) @ v
        return self.o_proj(out.swapaxes(-2, -3).reshape(*lead, length, dims))


class Block(nn.Module):
    def __init__(self, dims=16):
        super().__init__()
        self.norm = nn.RMSNorm(dims)
        self.self_attn = Attention(dims)
        self.mlp = MLP((dims, 2 * dims, dims))

    def __call__(self, x):
        x = x + self.self_attn(self.norm(x))
        return x + self.mlp(x)


class TinyTransformer(nn.Module):
    def __init__(self, vocab=32, dims=16, n_layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dims)
        self.layers = [Block(dims) for _ in range(n_layers)]
        self.head = nn.Linear(dims, vocab)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def lora_paths(model):
    return sorted(p for p, m in model.named_modules() if isinstance(m, LoRALinear))


def test_apply_lora_mlp():
    rng = np.random.default_rng(11)
    model = MLP()
    x = rand(rng, (6, 8))
    before = model(x)
    blas = use_blas_linear(MLP())
    blas.update(model.parameters())
    assert apply_lora(model, rank=2, alpha=4.0) is model
    assert lora_paths(model) == ["layers.0", "layers.1", "layers.2"]
    assert keys(model.trainable_parameters()) == [
        f"layers.{i}.{n}" for i in range(3) for n in ("lora_a", "lora_b")
    ]
    assert all(m.scale == 2.0 and m.rank == 2 for m in model.layers)
    assert mx.array_equal(model(x), blas(x))  # fresh adapters: exactly the BLAS base
    assert_close(model(x), before, mx.float32, k=16)

    model = apply_lora(MLP(), target_modules=["layers.1"])
    assert lora_paths(model) == ["layers.1"]
    assert [type(m) for m in model.layers] == [BLASLinear, LoRALinear, BLASLinear]
    assert keys(model.trainable_parameters()) == ["layers.1.lora_a", "layers.1.lora_b"]
    plain = apply_lora(MLP(), target_modules="layers.1", blas_linear=False)
    assert [type(m) for m in plain.layers] == [nn.Linear, LoRALinear, nn.Linear]
    assert keys(plain.trainable_parameters()) == ["layers.1.lora_a", "layers.1.lora_b"]

    root = apply_lora(nn.Linear(4, 2), rank=1)
    assert type(root) is LoRALinear and keys(root.trainable_parameters()) == ["lora_a", "lora_b"]


def test_apply_lora_attention_targets():
    model = TinyTransformer()
    model = apply_lora(model, rank=4, target_modules=["q_proj", "self_attn.v_proj"])
    assert lora_paths(model) == [
        f"layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "v_proj")
    ]
    assert keys(model.trainable_parameters()) == [
        f"layers.{i}.self_attn.{n}.{a}"
        for i in range(2)
        for n in ("q_proj", "v_proj")
        for a in ("lora_a", "lora_b")
    ]
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            assert type(module) is BLASLinear, path
    assert keys(model.embed.trainable_parameters()) == []
    assert keys(model.layers[0].norm.trainable_parameters()) == []
    assert model(mx.array([[1, 2, 3, 4]])).shape == (1, 4, 32)

    model = apply_lora(TinyTransformer(), target_modules=["layers.1.self_attn.k_proj", "head"])
    assert lora_paths(model) == ["head", "layers.1.self_attn.k_proj"]

    grads = nn.value_and_grad(model, lambda t: model(t).sum())(mx.array([[1, 2, 3]]))[1]
    assert keys(grads) == keys(model.trainable_parameters())


@pytest.mark.parametrize("targets", [["proj"], ["attn.q_proj"], ["mlp"], []])
def test_apply_lora_matching_nothing_raises(targets):
    model = TinyTransformer()
    with pytest.raises(ValueError, match="matched no") as info:
        apply_lora(model, target_modules=targets)
    assert str(targets) in str(info.value)
    assert "layers.0.self_attn.q_proj" in str(info.value)
    if targets == ["mlp"]:
        assert "layers.0.mlp (MLP), layers.1.mlp (MLP)" in str(info.value)
    assert lora_paths(model) == [] and keys(model.trainable_parameters())  # untouched


def test_apply_lora_shared_layer_and_fuse():
    rng = np.random.default_rng(12)
    net = Net()
    x = rand(rng, (3, 8))
    apply_lora(net, rank=2, target_modules=["layers.1"])
    assert type(net.tied) is LoRALinear and net.tied is net.layers[1]
    net.update(tree_map(lambda a: rand(rng, a.shape), net.trainable_parameters()))
    unfused = net(x)
    assert fuse_lora(net) is net
    assert lora_paths(net) == [] and type(net.layers[1]) is nn.Linear
    assert net.tied is net.layers[1]
    assert keys(net.trainable_parameters()) == []
    assert_close(net(x), unfused, mx.float32, k=8)


def test_functional_per_task_model():
    """A whole model called with a per-task adapter tree (module.update) equals vmap
    of the single-adapter model over the tasks, in value and gradient."""
    rng = np.random.default_rng(13)
    model = apply_lora(TinyTransformer(), rank=2, target_modules=["q_proj", "v_proj", "mlp"])
    theta = model.trainable_parameters()
    thetas = tree_map(lambda a: rand(rng, (T, *a.shape)), theta)
    tokens = mx.array(rng.integers(0, 32, size=(T, 2, 5)))

    def per_task(p):
        return call_with(model, p, tokens)

    def vmapped(p):
        return mx.vmap(lambda q, t: call_with(model, q, t))(p, tokens)

    out = per_task(thetas)
    assert out.shape == (T, 2, 5, 32)
    assert_close(out, vmapped(thetas), mx.float32, k=32)
    cot = rand(rng, out.shape)
    g1 = mx.grad(lambda p: dot(per_task(p), cot))(thetas)
    g2 = mx.grad(lambda p: dot(vmapped(p), cot))(thetas)
    for (k1, a), (k2, b) in zip(tree_flatten(g1), tree_flatten(g2), strict=True):
        assert k1 == k2
        assert_close(a, b, mx.float32, k=256, label=k1)
    assert all(v.ndim == 2 for _, v in tree_flatten(model.trainable_parameters()))


def test_adapter_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(14)
    model = apply_lora(TinyTransformer(), rank=4, target_modules=["q_proj", "v_proj"])
    model.update(tree_map(lambda a: rand(rng, a.shape), model.trainable_parameters()))
    tokens = mx.array([[3, 1, 4, 1, 5]])
    path = str(tmp_path / "adapters.safetensors")
    mx.save_safetensors(path, dict(tree_flatten(model.trainable_parameters())))

    other = apply_lora(TinyTransformer(), rank=4, target_modules=["q_proj", "v_proj"])
    other.update(model.parameters())
    other.update(tree_map(mx.zeros_like, other.trainable_parameters()))
    assert not mx.array_equal(other(tokens), model(tokens))
    other.load_weights(path, strict=False)
    assert mx.array_equal(other(tokens), model(tokens))
    loaded = mx.load(path)
    assert sorted(loaded) == keys(model.trainable_parameters())


# --------------------------------------------------------------------------- mlx-lm


@pytest.mark.skipif(not HAS_MLX_LM, reason="mlx-lm is not installed")
@pytest.mark.parametrize("bias", BIAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_matches_mlx_lm_layer(dtype, bias):
    from mlx_lm.tuner.lora import LoRALinear as MlxLmLoRALinear

    rng = np.random.default_rng(15)
    ours = lora_layer(rng, dtype, bias)
    theirs = MlxLmLoRALinear.from_base(
        base_linear(rng, dtype, bias), r=RANK, dropout=0.0, scale=ours.scale
    )
    theirs.linear.update({k: ours[k] for k in ("weight", "bias") if k in ours})
    theirs.update({"lora_a": ours.lora_a, "lora_b": ours.lora_b})
    x = rand(rng, (2, 3, D_IN), dtype)
    expected = theirs(x)
    assert_close(ours(x), expected, expected.dtype, k=D_IN, rtol=2 * tol(dtype, D_IN))
    assert_close(ours.fuse().weight, theirs.fuse().weight, dtype, k=RANK, rtol=2 * tol(dtype, RANK))


@pytest.mark.skipif(not HAS_MLX_LM, reason="mlx-lm is not installed")
def test_adapters_load_into_mlx_lm_model(tmp_path):
    from mlx_lm.models.llama import Model, ModelArgs
    from mlx_lm.tuner.utils import linear_to_lora_layers

    args = ModelArgs(
        model_type="llama",
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=48,
        num_attention_heads=4,
        rms_norm_eps=1e-5,
        vocab_size=40,
    )
    target = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
    theirs, ours = Model(args), Model(args)
    ours.update(theirs.parameters())
    theirs.freeze()
    linear_to_lora_layers(theirs, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": target})
    apply_lora(ours, rank=4, alpha=8.0, target_modules=target)
    assert keys(ours.trainable_parameters()) == keys(theirs.trainable_parameters())

    rng = np.random.default_rng(16)
    ours.update(tree_map(lambda a: rand(rng, a.shape), ours.trainable_parameters()))
    path = str(tmp_path / "adapters.safetensors")
    mx.save_safetensors(path, dict(tree_flatten(ours.trainable_parameters())))
    theirs.load_weights(path, strict=False)
    tokens = mx.array([[1, 5, 9, 2, 7, 3]])
    assert_close(ours(tokens), theirs(tokens), mx.float32, k=64)
