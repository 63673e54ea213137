"""Meta-learners: the batched fast path against the naive per-task loop, MAML's
meta-gradient against finite differences and a hand computation, adapt(),
NaN handling, bad input and checkpoints."""

from __future__ import annotations

import math
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from metapeft.learners import FOMAML, MAML, MetaSGD, Reptile

LEARNERS = {
    "maml": lambda m, **kw: MAML(m, optim.Adam(1e-2, bias_correction=True), **kw),
    "fomaml": lambda m, **kw: FOMAML(m, optim.Adam(1e-2, bias_correction=True), **kw),
    "metasgd": lambda m, **kw: MetaSGD(m, optim.Adam(1e-2, bias_correction=True), **kw),
    "reptile": lambda m, **kw: Reptile(m, epsilon=0.5, **kw),
    "reptile_adam": lambda m, **kw: Reptile(m, optim.Adam(1e-2), **kw),
}


def mse(model, x, y):
    return nn.losses.mse_loss(model(x), y)


def sinusoid_episodes(tasks=6, support=5, query=7, seed=0):
    rng = np.random.default_rng(seed)
    amp = rng.uniform(0.1, 5.0, (tasks, 1, 1))
    phase = rng.uniform(0, np.pi, (tasks, 1, 1))
    sx = rng.uniform(-5, 5, (tasks, support, 1))
    qx = rng.uniform(-5, 5, (tasks, query, 1))
    arrays = {
        "support_x": sx,
        "support_y": amp * np.sin(sx - phase),
        "query_x": qx,
        "query_y": amp * np.sin(qx - phase),
    }
    return SimpleNamespace(**{k: mx.array(v.astype(np.float32)) for k, v in arrays.items()})


def mlp(seed=0, hidden=16):
    mx.random.seed(seed)
    model = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    mx.eval(model.parameters())
    return model


def max_diff(a, b):
    """Largest elementwise difference between two trees with the same leaf paths."""
    a, b = dict(tree_flatten(a)), dict(tree_flatten(b))
    assert a.keys() == b.keys()
    return max(mx.abs(a[k] - b[k]).max().item() for k in a)


@pytest.mark.parametrize("name", list(LEARNERS))
@pytest.mark.parametrize("inner_steps", [1, 3])
def test_batched_matches_naive_loop(name, inner_steps):
    episodes = sinusoid_episodes()
    runs = []
    for batched in (True, False):
        model = mlp()
        learner = LEARNERS[name](model, inner_lr=0.02, inner_steps=inner_steps, batched=batched)
        metrics = [learner.meta_train_step(episodes, mse) for _ in range(3)]
        runs.append((metrics, learner.meta_parameters()))
    (fast, fast_meta), (naive, naive_meta) = runs
    for a, b in zip(fast, naive, strict=True):
        assert a.keys() >= {"support_loss", "query_loss", "param_diff"}
        for key in a:
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-5), (key, a[key], b[key])
    assert max_diff(fast_meta, naive_meta) < 1e-4


@pytest.mark.parametrize("compile", [True, False])
def test_compiled_and_eager_agree(compile):
    episodes = sinusoid_episodes()
    results = []
    for use_compile in (True, compile):
        model = mlp()
        learner = MAML(model, optim.SGD(0.1), inner_lr=0.05, compile=use_compile)
        results.append([learner.meta_train_step(episodes, mse)["query_loss"] for _ in range(3)])
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5)


def test_one_task_maml_step_equals_hand_computation():
    """A 1-parameter model y = w * x, one inner step, plain SGD outer step."""
    x_s, y_s, x_q, y_q = 1.5, 2.0, -0.5, 1.0
    w0, alpha, beta = 0.3, 0.1, 0.05
    model = nn.Linear(1, 1, bias=False)
    model.update({"weight": mx.array([[w0]])})
    learner = MAML(model, optim.SGD(beta), inner_lr=alpha, inner_steps=1, compile=False)
    episodes = SimpleNamespace(
        support_x=mx.array([[[x_s]]]),
        support_y=mx.array([[[y_s]]]),
        query_x=mx.array([[[x_q]]]),
        query_y=mx.array([[[y_q]]]),
    )
    learner.meta_train_step(episodes, mse)
    # L_s(w) = (w x_s - y_s)^2, w' = w - alpha dL_s/dw, L_q(w') = (w' x_q - y_q)^2
    grad_s = 2 * (w0 * x_s - y_s) * x_s
    w1 = w0 - alpha * grad_s
    dw1_dw0 = 1 - alpha * 2 * x_s**2
    meta_grad = 2 * (w1 * x_q - y_q) * x_q * dw1_dw0
    expected = w0 - beta * meta_grad
    assert model.weight.item() == pytest.approx(expected, rel=1e-5)


def meta_gradient(learner, meta, data):
    """The mean task objectives and the gradient of the mean query loss, all tasks at once."""
    return learner.tasks.value_and_grad(
        lambda m, *task: learner.task_objective(m, *task, mse), meta, data
    )


def test_maml_meta_gradient_matches_finite_differences():
    episodes = sinusoid_episodes(tasks=3, support=4, query=4)
    model = mlp(hidden=4)
    learner = MAML(model, optim.SGD(1.0), inner_lr=0.05, inner_steps=2, compile=False)
    meta = learner.meta_parameters()
    data = (episodes.support_x, episodes.support_y, episodes.query_x, episodes.query_y)
    (loss, _, _), grads = meta_gradient(learner, meta, data)

    def objective(flat_value, key):
        model2 = mlp(hidden=4)
        model2.update(model.parameters())
        params = dict(tree_flatten(model2.trainable_parameters()))
        params[key] = flat_value
        from mlx.utils import tree_unflatten

        model2.update(tree_unflatten(list(params.items())))
        other = MAML(model2, optim.SGD(1.0), inner_lr=0.05, inner_steps=2, compile=False)
        (value, _, _), _ = meta_gradient(other, other.meta_parameters(), data)
        return value.item()

    eps = 1e-3
    for key, grad in tree_flatten(grads["params"]):
        value = dict(tree_flatten(meta["params"]))[key]
        flat = np.array(value).astype(np.float64)
        idx = tuple(np.unravel_index(0, flat.shape))
        up, down = flat.copy(), flat.copy()
        up[idx] += eps
        down[idx] -= eps
        numeric = (
            objective(mx.array(up.astype(np.float32)), key)
            - objective(mx.array(down.astype(np.float32)), key)
        ) / (2 * eps)
        assert np.array(grad)[idx] == pytest.approx(numeric, rel=2e-2, abs=2e-3), key
    assert math.isfinite(loss.item())


@pytest.mark.parametrize("name", ["maml", "metasgd", "reptile"])
def test_adapt_leaves_meta_parameters_unchanged(name):
    episodes = sinusoid_episodes()
    model = mlp()
    learner = LEARNERS[name](model, inner_lr=0.05)
    learner.meta_train_step(episodes, mse)
    before = [np.array(v) for _, v in tree_flatten(learner.meta_parameters())]
    adapted = learner.adapt(episodes.support_x[0], episodes.support_y[0], steps=5, loss_fn=mse)
    after = [np.array(v) for _, v in tree_flatten(learner.meta_parameters())]
    for a, b in zip(before, after, strict=True):
        assert np.array_equal(a, b)
    assert max_diff(adapted, model.trainable_parameters()) > 0
    # adaptation lowers the support loss of that task
    start = mse(model, episodes.support_x[0], episodes.support_y[0]).item()
    model.update(adapted)
    assert mse(model, episodes.support_x[0], episodes.support_y[0]).item() < start


def test_evaluate_returns_per_task_losses():
    episodes = sinusoid_episodes(tasks=5)
    learner = MAML(mlp(), inner_lr=0.01)
    out = learner.evaluate(episodes, steps=3, loss_fn=mse, metric_fn=mse)
    assert out["query_losses"].shape == (5,)
    assert out["query_metrics"].shape == (5,)
    assert out["query_loss"] == pytest.approx(float(out["query_losses"].mean()), rel=1e-5)
    # scored on its own support set, every task's loss falls as it adapts
    own = SimpleNamespace(
        support_x=episodes.support_x,
        support_y=episodes.support_y,
        query_x=episodes.support_x,
        query_y=episodes.support_y,
    )
    before = learner.evaluate(own, steps=0, loss_fn=mse)["query_losses"]
    after = learner.evaluate(own, steps=10, loss_fn=mse)["query_losses"]
    assert (after < before).all()


def test_nan_loss_stops_and_keeps_parameters():
    episodes = sinusoid_episodes()
    learner = MAML(mlp(), inner_lr=0.05)
    learner.meta_train_step(episodes, mse)
    before = [np.array(v) for _, v in tree_flatten(learner.meta_parameters())]
    state_before = [np.array(v) for _, v in tree_flatten(learner.optimizer.state)]
    bad = SimpleNamespace(**{**vars(episodes), "query_y": episodes.query_y * float("nan")})
    with pytest.raises(FloatingPointError, match="meta-step 2"):
        learner.meta_train_step(bad, mse)
    after = [np.array(v) for _, v in tree_flatten(learner.meta_parameters())]
    state_after = [np.array(v) for _, v in tree_flatten(learner.optimizer.state)]
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(state_before, state_after, strict=True))
    assert learner.step == 1
    learner.meta_train_step(episodes, mse)  # carries on from the good state
    assert learner.step == 2


def test_non_scalar_loss_is_rejected():
    learner = MAML(mlp(), inner_lr=0.05)
    with pytest.raises(ValueError, match="scalar"):
        learner.meta_train_step(sinusoid_episodes(), lambda m, x, y: (m(x) - y) ** 2)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="inner_steps"):
        MAML(mlp(), inner_steps=0)
    with pytest.raises(ValueError, match="inner_lr"):
        MAML(mlp(), inner_lr=float("nan"))
    with pytest.raises(ValueError, match="epsilon"):
        Reptile(mlp(), epsilon=-1.0)
    with pytest.raises(TypeError, match="mlx.nn.Module"):
        MAML(lambda x: x)
    frozen = mlp()
    frozen.freeze()
    with pytest.raises(ValueError, match="no trainable parameters"):
        MAML(frozen)


@pytest.mark.parametrize("name", ["maml", "metasgd", "reptile"])
def test_checkpoint_round_trip(tmp_path, name):
    episodes = sinusoid_episodes()
    learner = LEARNERS[name](mlp(), inner_lr=0.05)
    for _ in range(2):
        learner.meta_train_step(episodes, mse)
    path = tmp_path / "ckpt.safetensors"
    learner.save(path)
    other = LEARNERS[name](mlp(seed=1), inner_lr=0.05)
    other.load(path)
    assert other.step == 2
    assert max_diff(other.meta_parameters(), learner.meta_parameters()) == 0
    # both continue identically
    a = learner.meta_train_step(episodes, mse)
    b = other.meta_train_step(episodes, mse)
    assert a == pytest.approx(b, rel=1e-6)


def test_checkpoint_errors_name_the_file(tmp_path):
    learner = MAML(mlp(), inner_lr=0.05)
    path = tmp_path / "ckpt.safetensors"
    learner.save(path)
    with pytest.raises(ValueError, match="algorithm"):
        Reptile(mlp()).load(path)
    with pytest.raises(ValueError, match="does not match this model"):
        MAML(mlp(hidden=8)).load(path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        MAML(mlp()).load(corrupt)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match="truncated.safetensors"):
        MAML(mlp()).load(truncated)
    with pytest.raises(FileNotFoundError, match="missing"):
        MAML(mlp()).load(tmp_path / "missing.safetensors")


def lora_mlp(seed=0):
    from metapeft.nn import apply_lora

    model = mlp(seed=seed, hidden=8)
    apply_lora(model, rank=2, alpha=4.0)
    # a non-zero lora_b, so that every adapter receives a gradient from the start
    for layer in (model.layers[0], model.layers[2]):
        layer.lora_b = mx.random.normal(layer.lora_b.shape, key=mx.random.key(seed)) * 0.1
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("name", ["maml", "fomaml", "metasgd", "reptile"])
def test_lora_model_batched_matches_naive_and_base_stays_frozen(name):
    episodes = sinusoid_episodes()
    runs = []
    for batched in (True, False):
        model = lora_mlp()
        base = {k: np.array(v) for k, v in tree_flatten(model.parameters()) if "lora" not in k}
        learner = LEARNERS[name](model, inner_lr=0.02, inner_steps=2, batched=batched)
        for _ in range(2):
            learner.meta_train_step(episodes, mse)
        trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
        assert trainable and all(k.endswith(("lora_a", "lora_b")) for k in trainable)
        after = {k: np.array(v) for k, v in tree_flatten(model.parameters()) if "lora" not in k}
        assert all(np.array_equal(base[k], after[k]) for k in base)
        runs.append(learner.meta_parameters())
    assert max_diff(*runs) < 1e-4


def test_loss_fn_given_once_serves_adapt_and_evaluate():
    episodes = sinusoid_episodes(tasks=3)
    learner = MAML(mlp(), inner_lr=0.01, loss_fn=mse)
    learner.meta_train_step(episodes)
    assert learner.evaluate(episodes, steps=1)["query_losses"].shape == (3,)
    learner.adapt(episodes.support_x[0], episodes.support_y[0])
    with pytest.raises(ValueError, match="no loss_fn"):
        MAML(mlp()).evaluate(episodes)
