"""metapeft.nn.use_fast_layers: plain and mlx-lm models on the fused primitives give the
stock models' logits, losses and gradients, share their weights, and are what the
learners run by default."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

pytest.importorskip("mlx_lm")

from metapeft import ops  # noqa: E402
from metapeft.learners import FOMAML, MAML  # noqa: E402
from metapeft.lm import LoRASpec, add_lora, lm_loss, load_model  # noqa: E402
from metapeft.lm.random_model import save_random_model  # noqa: E402
from metapeft.nn import BLASEmbedding, BLASLinear, LoRALinear, use_fast_layers  # noqa: E402
from metapeft.nn.fast import output_layer  # noqa: E402

SIZES = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
FAST_FAMILIES = ("llama", "qwen2", "qwen3")  # tied output embeddings in all three


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast-models")
    paths = {}
    for arch in (*FAST_FAMILIES, "mistral", "phi3"):
        save_random_model(root / arch, arch, **SIZES)
        paths[arch] = root / arch
    save_random_model(root / "llama-q4", "llama", quantize_bits=4, **SIZES)
    paths["llama-q4"] = root / "llama-q4"
    return paths


def tokens(seed=0, shape=(2, 7), vocab=50):
    rng = np.random.default_rng(seed)
    x, y = rng.integers(4, vocab, size=(2, *shape))
    return mx.array(x), mx.array(y)


def perturbed_lora(model, seed=0):
    """Adapters with non-zero lora_b, so that they change the output and get gradients."""
    mx.random.seed(seed)
    add_lora(model, LoRASpec(rank=4), fast=False)
    model.update(tree_map(lambda p: p + 0.05, model.trainable_parameters()))
    mx.eval(model.parameters())
    return model


def stock_loss(model, x, y):
    return nn.losses.cross_entropy(model(x).astype(mx.float32), y).mean()


def assert_trees_close(a, b, atol):
    """Leaf by leaf, to ``atol`` or 1e-4 of the leaf's largest magnitude (float32 sums
    in another order), whichever is larger."""
    fa, fb = dict(tree_flatten(a)), dict(tree_flatten(b))
    assert fa.keys() == fb.keys()
    for k in fa:
        leaf_atol = max(atol, 1e-4 * float(mx.abs(fb[k]).max()))
        np.testing.assert_allclose(
            np.array(fa[k]), np.array(fb[k]), rtol=1e-4, atol=leaf_atol, err_msg=k
        )


@pytest.mark.parametrize("arch", [*FAST_FAMILIES, "mistral", "phi3", "llama-q4"])
def test_logits_loss_and_gradients_equal_the_stock_model(models, arch):
    x, y = tokens()
    stock = perturbed_lora(load_model(models[arch])[0])
    fast = perturbed_lora(load_model(models[arch])[0])
    use_fast_layers(fast)
    np.testing.assert_allclose(np.array(fast(x)), np.array(stock(x)), atol=2e-4)
    l1, g1 = nn.value_and_grad(stock, stock_loss)(stock, x, y)
    l2, g2 = nn.value_and_grad(fast, lm_loss)(fast, x, y)
    assert l2.item() == pytest.approx(l1.item(), rel=1e-5)
    assert_trees_close(g2, g1, atol=1e-5)


@pytest.mark.parametrize("arch", FAST_FAMILIES)
def test_the_fast_blocks_are_used_and_share_the_weights(models, arch):
    model = load_model(models[arch])[0]
    before = dict(tree_flatten(model.parameters()))
    frozen_before = {k for k, _ in tree_flatten(model.trainable_parameters())}
    use_fast_layers(model)
    block = model.layers[0]
    assert type(block.self_attn).__name__ == "FastAttention"
    assert type(block.mlp).__name__ == "FastMLP"
    assert type(block.input_layernorm).__name__ == "FastRMSNorm"
    assert type(block.self_attn.rope).__name__ == "FastRoPE"
    assert isinstance(block.self_attn.q_proj, BLASLinear)
    assert isinstance(model.model.embed_tokens, BLASEmbedding)
    after = dict(tree_flatten(model.parameters()))
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before), "weights must be shared, not copied"
    assert {k for k, _ in tree_flatten(model.trainable_parameters())} == frozen_before
    assert use_fast_layers(model) is model  # idempotent


def test_generation_with_a_kv_cache_is_unchanged(models):
    from mlx_lm import generate

    stock, tokenizer, _ = load_model(models["llama"])
    fast, _, _ = load_model(models["llama"])
    use_fast_layers(fast)
    texts = [generate(m, tokenizer, prompt="abc", max_tokens=6) for m in (stock, fast)]
    assert texts[0] == texts[1]


def test_per_task_adapters_under_vmap_equal_one_task_at_a_time(models):
    """The learners' way: one adapter tree per task, the loss vmapped over the tasks."""
    x, y = tokens(shape=(3, 2, 6))
    grads = []
    for fast in (False, True):
        model = perturbed_lora(load_model(models["qwen3"])[0])
        if fast:
            use_fast_layers(model)
        params = model.trainable_parameters()
        per_task = tree_map(lambda p: mx.stack([p, p * 1.1, p * 0.9]), params)

        def task_loss(p, xt, yt, model=model, fast=fast):
            model.update(p)
            return (lm_loss if fast else stock_loss)(model, xt, yt)

        g = mx.vmap(mx.grad(task_loss))(per_task, x, y)
        model.update(params)
        grads.append(g)
    assert_trees_close(grads[1], grads[0], atol=1e-5)


def test_plain_networks_get_blas_layers_and_keep_their_numbers():
    mx.random.seed(0)
    net = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 20))
    x = mx.array([[1, 2, 3]])
    before = net(x)
    emb_out = net.layers[0].as_linear(mx.ones((2, 8)))
    use_fast_layers(net)
    assert isinstance(net.layers[1], BLASLinear) and isinstance(net.layers[0], BLASEmbedding)
    np.testing.assert_allclose(np.array(net(x)), np.array(before), atol=1e-5)
    np.testing.assert_allclose(
        np.array(net.layers[0].as_linear(mx.ones((2, 8)))), np.array(emb_out), atol=1e-5
    )


def test_learners_take_the_fast_path_unless_told_not_to():
    def mlp():
        mx.random.seed(0)
        return nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))

    model = mlp()
    learner = MAML(model, inner_lr=0.01)
    assert learner.model is model and isinstance(model.layers[0], BLASLinear)
    model = mlp()
    FOMAML(model, inner_lr=0.01, fast=False)
    assert type(model.layers[0]) is nn.Linear


def test_lm_loss_takes_the_output_layer_where_it_is_a_plain_one(models):
    """lm_loss fuses the output layer into the loss (no logits held) for the Llama
    family's tied and untied heads; other heads, quantized or adapted, give logits."""
    for arch, head in [("llama", "model.embed_tokens"), ("mistral", "lm_head")]:
        model = load_model(models[arch])[0]
        use_fast_layers(model)
        body, weight = output_layer(model)
        assert weight is dict(tree_flatten(model.parameters()))[head + ".weight"]
        x, _ = tokens()
        np.testing.assert_allclose(
            np.array(ops.linear(body(x), weight)), np.array(model(x)), atol=1e-5
        )
    assert output_layer(load_model(models["phi3"])[0]) is None
    assert output_layer(load_model(models["llama-q4"])[0]) is None
    adapted = load_model(models["mistral"])[0]
    adapted.lm_head = LoRALinear.from_base(adapted.lm_head, rank=2)
    assert output_layer(adapted) is None


def test_lm_loss_matches_mlx_cross_entropy_with_masking():
    logits = mx.random.normal((2, 5, 11))
    y = mx.array([[1, 2, -100, 4, 5], [-100, -100, 3, 3, 10]])

    class Fixed(nn.Module):
        def __call__(self, x):
            return logits

    mask = y != -100
    expected = (nn.losses.cross_entropy(logits, mx.where(mask, y, 0)) * mask).sum() / mask.sum()
    assert lm_loss(Fixed(), None, y).item() == pytest.approx(expected.item(), rel=1e-6)
    assert ops.cross_entropy(logits, mx.where(mask, y, 0)).dtype == mx.float32


def test_llama3_rope_scaling_equals_the_stock_rope():
    """Llama 3.1/3.2 configs scale RoPE's frequencies (mlx-lm's Llama3RoPE)."""
    from mlx_lm.models import llama

    args = llama.ModelArgs.from_dict(
        dict(
            model_type="llama",
            hidden_size=64,
            num_hidden_layers=1,
            intermediate_size=96,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            vocab_size=50,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 32.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
            },
        )
    )
    stock = llama.Model(args)
    mx.eval(stock.parameters())
    fast = llama.Model(args)
    fast.update(stock.parameters())
    use_fast_layers(fast)
    assert type(fast.layers[0].self_attn.rope).__name__ == "FastLlama3RoPE"
    q = mx.random.normal((1, 4, 9, 16))
    for offset in (0, 5):
        expected = stock.layers[0].self_attn.rope(q, offset=offset)
        got = fast.layers[0].self_attn.rope(q, offset=offset)
        np.testing.assert_allclose(np.array(got), np.array(expected), atol=1e-5)
    x, _ = tokens()
    np.testing.assert_allclose(np.array(fast(x)), np.array(stock(x)), atol=2e-4)


def test_quantized_layers_dequantize_onto_the_blas_on_the_cpu(models):
    stock = load_model(models["llama-q4"])[0]
    fast = load_model(models["llama-q4"])[0]
    use_fast_layers(fast)
    assert type(fast.layers[0].self_attn.k_proj).__name__ == "FastQuantizedLinear"
    assert type(fast.model.embed_tokens).__name__ == "FastQuantizedEmbedding"
    x, _ = tokens()
    np.testing.assert_allclose(np.array(fast(x)), np.array(stock(x)), atol=2e-4)
    # the tied output layer alone, through as_linear
    h = mx.random.normal((3, SIZES["hidden_size"]))
    np.testing.assert_allclose(
        np.array(fast.model.embed_tokens.as_linear(h)),
        np.array(stock.model.embed_tokens.as_linear(h)),
        atol=2e-4,
    )
