"""metapeft.lm: LoRA on mlx-lm architectures, text tasks, export, MetaLoRAAdapter."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

pytest.importorskip("mlx_lm")

from lm_helpers import substitution_tasks  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters  # noqa: E402

from metapeft.learners import FOMAML, Reptile  # noqa: E402
from metapeft.lm import (  # noqa: E402
    IGNORE,
    LoRASpec,
    MetaLoRAAdapter,
    QLoRALinear,
    TextTasks,
    add_lora,
    checkpoint_blocks,
    lm_loss,
    load_model,
    save_adapters,
    trainer_loss,
)
from metapeft.lm.random_model import ARCHITECTURES, save_random_model  # noqa: E402
from metapeft.nn import use_fast_layers  # noqa: E402
from metapeft.training import meta_train_lora  # noqa: E402

SIZES = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One tiny random model folder per architecture (and a 4-bit Llama)."""
    root = tmp_path_factory.mktemp("lm-models")
    paths = {}
    for arch in ARCHITECTURES:
        save_random_model(root / arch, arch, **SIZES)
        paths[arch] = root / arch
    save_random_model(root / "llama-q4", "llama", quantize_bits=4, **SIZES)
    paths["llama-q4"] = root / "llama-q4"
    return paths


@pytest.fixture(scope="module")
def tasks_file(tmp_path_factory):
    return substitution_tasks(tmp_path_factory.mktemp("lm-tasks") / "tasks.jsonl")


def trainable_shapes(model):
    return {k: v.shape for k, v in tree_flatten(model.trainable_parameters())}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize(
    "spec",
    [LoRASpec(rank=4), LoRASpec(rank=2, keys=("self_attn.o_proj",), num_layers=1)],
    ids=["all-linear", "o_proj-last-block"],
)
def test_adapters_sit_where_mlx_lm_puts_them(models, arch, spec):
    ours, _, _ = load_model(models[arch])
    add_lora(ours, spec)
    theirs, _, _ = load_model(models[arch])
    theirs.freeze()
    linear_to_lora_layers(theirs, spec.num_layers, spec.lora_parameters())
    assert trainable_shapes(ours) == trainable_shapes(theirs)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fresh_adapters_leave_the_model_unchanged(models, arch):
    model, _, _ = load_model(models[arch])
    tokens = mx.array([[5, 6, 7, 8, 9]])
    before = model(tokens)
    add_lora(model, LoRASpec(rank=4))
    np.testing.assert_allclose(np.array(model(tokens)), np.array(before), atol=1e-4)


def test_target_modules_matching_nothing_names_them(models):
    model, _, _ = load_model(models["llama"])
    with pytest.raises(ValueError, match=r"q_projj.*self_attn\.q_proj"):
        add_lora(model, LoRASpec(keys=("self_attn.q_projj",)))


def test_too_many_blocks_is_an_error(models):
    model, _, _ = load_model(models["llama"])
    with pytest.raises(ValueError, match="num_layers=5.*2 transformer blocks"):
        add_lora(model, LoRASpec(num_layers=5))


def test_not_an_mlx_lm_folder_says_what_is_missing(tmp_path, models):
    with pytest.raises(FileNotFoundError, match="missing: no such model folder"):
        load_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="no model.*safetensors"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 3}))
    with pytest.raises(ValueError, match="model_type"):
        load_model(tmp_path)


# ------------------------------------------------------------------ text tasks


def test_prompt_and_padding_are_masked(models, tasks_file):
    _, tokenizer, _ = load_model(models["llama"])
    tasks = TextTasks.from_jsonl(tasks_file, tokenizer, support_size=2, query_size=2)
    x, y = tasks.encode(tasks.tasks["t0"][:1])
    tokens = tasks.tasks["t0"][0].tokens  # "abc>" + 3 letters + </s>
    assert tasks.tasks["t0"][0].offset == len(tokenizer.encode("abc>"))
    counted = y[0][y[0] != IGNORE]
    assert counted.tolist() == list(tokens[tasks.tasks["t0"][0].offset :])
    assert x.shape == (1, tasks.seq_length)


def test_loss_ignores_padding(models):
    model, _, _ = load_model(models["llama"])
    x = mx.array([[5, 6, 7, 8]])
    y = mx.array([[6, 7, 8, 2]])
    padded_x = mx.array([[5, 6, 7, 8, 0, 0]])
    padded_y = mx.array([[6, 7, 8, 2, IGNORE, IGNORE]])
    assert lm_loss(model, x, y).item() == pytest.approx(lm_loss(model, padded_x, padded_y).item())


def test_text_lines_get_an_eos_and_no_mask(models, tmp_path):
    _, tokenizer, _ = load_model(models["llama"])
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps({"task": t, "text": "ab cd"}) + "\n" for t in "xxyy"))
    tasks = TextTasks.from_jsonl(f, tokenizer, support_size=1, query_size=1)
    e = tasks.sample(3)
    assert e.support_x.shape == (3, 1, 5) and e.support_x.dtype == mx.int32
    assert e.support_y[0, 0].tolist() == list(tokenizer.encode("ab cd")[1:]) + [2]


@pytest.mark.parametrize(
    "line, message",
    [
        ({"task": "a", "txt": "hello"}, r"t\.jsonl:2: no text"),
        ({"text": "hello"}, r"t\.jsonl:2: no \"task\""),
        ({"task": "a", "prompt": "p"}, r"t\.jsonl:2: \"completion\" must be a string"),
    ],
)
def test_bad_jsonl_lines_name_file_and_line(models, tmp_path, line, message):
    _, tokenizer, _ = load_model(models["llama"])
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"task": "a", "text": "fine"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=message):
        TextTasks.from_jsonl(f, tokenizer, support_size=1, query_size=1)


def test_too_few_examples_names_the_task(models, tasks_file):
    _, tokenizer, _ = load_model(models["llama"])
    with pytest.raises(ValueError, match=r"tasks\.jsonl.*5 \+ 4 = 9.*'t0' has 8"):
        TextTasks.from_jsonl(tasks_file, tokenizer, support_size=5, query_size=4)


# ------------------------------------------------------------------ learners


@pytest.mark.parametrize("cls", [Reptile, FOMAML])
def test_all_tasks_at_once_equals_one_at_a_time(models, tasks_file, cls):
    _, tokenizer, _ = load_model(models["qwen3"])
    tasks = TextTasks.from_jsonl(tasks_file, tokenizer, support_size=2, query_size=2)
    episodes = tasks.sample(3)
    results = []
    for batched in (True, False):
        model, _, _ = load_model(models["qwen3"])
        mx.random.seed(1)
        add_lora(model, LoRASpec(rank=4))
        learner = cls(model, inner_lr=0.1, inner_steps=2, batched=batched, loss_fn=lm_loss)
        metrics = learner.meta_train_step(episodes)
        results.append((metrics, dict(tree_flatten(model.trainable_parameters()))))
    (m1, p1), (m2, p2) = results
    for k in ("support_loss", "query_loss"):
        assert m1[k] == pytest.approx(m2[k], rel=1e-4)
    for k in p1:
        np.testing.assert_allclose(np.array(p1[k]), np.array(p2[k]), atol=1e-5, err_msg=k)


def test_checkpointed_blocks_give_the_same_gradients(models):
    x = mx.array([[5, 6, 7, 8, 9, 10]])
    y = mx.array([[6, 7, 8, 9, 10, 2]])
    grads = []
    for checkpoint in (False, True):
        model, _, _ = load_model(models["llama"])
        mx.random.seed(0)
        add_lora(model, LoRASpec(rank=4))
        model.update(tree_map(lambda p: p + 0.01, model.trainable_parameters()))
        if checkpoint:
            checkpoint_blocks(model)
            assert type(model.layers[0]).__name__.startswith("Checkpointed")
        loss, g = nn.value_and_grad(model, lm_loss)(model, x, y)
        grads.append((loss.item(), dict(tree_flatten(g))))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    for k, v in grads[0][1].items():
        np.testing.assert_allclose(np.array(grads[1][1][k]), np.array(v), atol=1e-6, err_msg=k)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_trainer_loss_equals_mlx_lm_default_loss(models, arch):
    from mlx_lm.tuner.trainer import default_loss, iterate_batches

    model, _, _ = load_model(models[arch])
    model.freeze()
    mx.random.seed(0)
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0})
    model.update(tree_map(lambda p: p + 0.01, model.trainable_parameters()))
    use_fast_layers(model)
    examples = [([1, 5, 6, 7, 8, 2], 3), ([1, 9, 10, 2], 1), ([1, 11, 12, 13, 14, 15, 2], 5)]
    batch = next(iterate_batches(examples, 3, 64))
    results = []
    for loss in (default_loss, trainer_loss):
        (value, ntoks), g = nn.value_and_grad(model, loss)(model, *batch)
        results.append((value.item(), ntoks.item(), dict(tree_flatten(g))))
    (want, want_n, want_g), (got, got_n, got_g) = results
    # mlx-lm counts the targets from each offset up to the length, inclusive
    assert got == pytest.approx(want, rel=1e-5)
    assert got_n == want_n == sum(len(t) - o + 1 for t, o in examples)
    assert want_g.keys() == got_g.keys()
    for k, v in want_g.items():
        np.testing.assert_allclose(np.array(got_g[k]), np.array(v), atol=1e-5, err_msg=k)


def test_qlora_layer_matches_the_quantized_base_and_trains(models):
    model, _, _ = load_model(models["llama-q4"])
    x = mx.array([[5, 6, 7, 8]])
    y = mx.array([[6, 7, 8, 2]])
    before = model(x)
    add_lora(model, LoRASpec(rank=4))
    assert isinstance(model.layers[0].self_attn.q_proj, QLoRALinear)
    np.testing.assert_allclose(np.array(model(x)), np.array(before), atol=1e-4)
    _, g = nn.value_and_grad(model, lm_loss)(model, x, y)
    assert {k.rsplit(".", 1)[-1] for k, _ in tree_flatten(g)} == {"lora_a", "lora_b"}
    assert any(float(mx.abs(v).sum()) > 0 for k, v in tree_flatten(g) if k.endswith("lora_b"))


# ------------------------------------------------------------------ export and import


def test_exported_adapters_load_into_mlx_lm_with_the_same_outputs(models, tmp_path):
    spec = LoRASpec(rank=4, alpha=8.0, keys=("self_attn.qkv_proj", "mlp.down_proj"))
    model, _, _ = load_model(models["phi3"])
    add_lora(model, spec)
    model.update(tree_map(lambda p: p + 0.05, model.trainable_parameters()))
    save_adapters(tmp_path, model.trainable_parameters(), spec, {"model": "tiny"})
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["lora_parameters"] == {
        "rank": 4,
        "scale": 2.0,
        "dropout": 0.0,
        "keys": ["self_attn.qkv_proj", "mlp.down_proj"],
    }
    theirs, _, _ = load_model(models["phi3"])
    load_adapters(theirs, str(tmp_path))
    x = mx.array([[5, 6, 7, 8]])
    np.testing.assert_allclose(np.array(theirs(x)), np.array(model(x)), atol=1e-4)


def test_meta_lora_adapter_applies_and_resets(models, tmp_path):
    spec = LoRASpec(rank=2)
    model, _, _ = load_model(models["llama"])
    add_lora(model, spec)
    model.update(tree_map(lambda p: p + 0.1, model.trainable_parameters()))
    init = dict(tree_flatten(model.trainable_parameters()))
    MetaLoRAAdapter(init, spec).save(tmp_path)

    adapter = MetaLoRAAdapter.load(tmp_path)
    fresh, _, _ = load_model(models["llama"])
    adapter.apply(fresh)
    fresh.update(tree_map(lambda p: p * 3, fresh.trainable_parameters()))
    adapter.reset(fresh)
    for k, v in tree_flatten(fresh.trainable_parameters()):
        np.testing.assert_array_equal(np.array(v), np.array(init[k]))


@pytest.mark.parametrize(
    "other, message",
    [
        (("llama", LoRASpec(rank=4)), r"shape mismatch.*lora_a: file \(32, 2\), model \(32, 4\)"),
        (("phi3", LoRASpec(rank=2)), r"does not adapt:.*gate_proj.*missing for:.*qkv_proj"),
    ],
    ids=["other-rank", "other-architecture"],
)
def test_adapters_that_do_not_fit_are_rejected_naming_the_file(models, tmp_path, other, message):
    model, _, _ = load_model(models["llama"])
    add_lora(model, LoRASpec(rank=2))
    MetaLoRAAdapter.from_model(model, LoRASpec(rank=2)).save(tmp_path)
    arch, spec = other
    target, _, _ = load_model(models[arch])
    add_lora(target, spec)
    adapter = MetaLoRAAdapter.load(tmp_path)
    with pytest.raises(ValueError, match=r"adapters\.safetensors: adapters do not fit") as info:
        adapter.reset(target)
    assert info.match(message)


def test_base_adapters_start_meta_training(models, tasks_file, tmp_path):
    spec = LoRASpec(rank=2, keys=("self_attn.v_proj",))
    model, _, _ = load_model(models["llama"])
    add_lora(model, spec)
    model.update(tree_map(lambda p: p + 0.2, model.trainable_parameters()))
    save_adapters(tmp_path / "base", model.trainable_parameters(), spec)
    start = dict(tree_flatten(model.trainable_parameters()))
    meta_train_lora(
        models["llama"],
        tasks_file,
        tmp_path / "out",
        base_adapters=tmp_path / "base",
        rank=8,
        steps=1,
        inner_lr=1e-6,
        outer_lr=1e-6,
        support_size=2,
        query_size=2,
    )
    adapter = MetaLoRAAdapter.load(tmp_path / "out")
    assert adapter.spec == spec
    assert adapter.weights.keys() == start.keys()
    for k, v in adapter.weights.items():
        np.testing.assert_allclose(np.array(v), np.array(start[k]), atol=1e-4, err_msg=k)


def test_checkpointed_blocks_use_less_memory(tmp_path):
    save_random_model(tmp_path, "llama", hidden_size=64, num_layers=4)
    x = mx.random.randint(4, 50, (4, 256))
    y = mx.random.randint(4, 50, (4, 256))
    peaks = []
    for checkpoint in (False, True):
        model, _, _ = load_model(tmp_path)
        add_lora(model, LoRASpec(rank=4))
        if checkpoint:
            checkpoint_blocks(model)
        mx.eval(model.parameters())
        mx.reset_peak_memory()
        active = mx.get_active_memory()
        mx.eval(nn.value_and_grad(model, lm_loss)(model, x, y))
        peaks.append(mx.get_peak_memory() - active)
    assert peaks[1] < 0.75 * peaks[0], f"peak bytes without/with checkpointing: {peaks}"


def test_base_adapters_of_another_architecture_name_the_file(models, tmp_path):
    spec = LoRASpec(rank=2, keys=("self_attn.qkv_proj",))
    phi3, _, _ = load_model(models["phi3"])
    add_lora(phi3, spec)
    save_adapters(tmp_path, phi3.trainable_parameters(), spec)
    llama, _, _ = load_model(models["llama"])
    with pytest.raises(ValueError, match=r"adapters\.safetensors: target modules.*qkv_proj"):
        MetaLoRAAdapter.load(tmp_path).apply(llama)
