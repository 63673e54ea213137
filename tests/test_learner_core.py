"""The learner core: inner optimizers with state (batched against one task at a time,
and differentiated through by second-order MAML), the rollback of a non-finite
meta-step, the compiled step's cache, the task mapping of evaluate, the algorithm
registry, and what ``import metapeft`` loads."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref
from types import SimpleNamespace

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from test_learners import LEARNERS, max_diff, meta_gradient, mlp, mse, sinusoid_episodes

from metapeft.learners import ALGORITHMS, MAML, build_learner, core, get_algorithm, inner

INNER = {"sgd": inner.sgd, "momentum": lambda: inner.momentum(0.8), "adam": inner.adam}


def flat_numpy(tree):
    return {k: np.array(v) for k, v in tree_flatten(tree)}


@pytest.mark.parametrize("opt", ["momentum", "adam"])
@pytest.mark.parametrize("first_order", [False, True])
def test_inner_optimizers_batched_equal_one_task_at_a_time(opt, first_order):
    episodes = sinusoid_episodes(tasks=4)
    cls = get_algorithm("fomaml" if first_order else "maml")
    results = []
    for batched in (True, False):
        learner = cls(
            mlp(), inner_lr=0.03, inner_steps=3, batched=batched, inner_optimizer=INNER[opt]()
        )
        metrics = learner.meta_train_step(episodes, mse)
        results.append((metrics, learner.meta_parameters()))
    (m1, p1), (m2, p2) = results
    assert max_diff(p1, p2) < 1e-5
    for key in m1:
        assert m1[key] == pytest.approx(m2[key], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam"])
def test_maml_gradient_through_the_inner_optimizer_matches_finite_differences(opt):
    episodes = sinusoid_episodes(tasks=2, support=4, query=4)
    data = (episodes.support_x, episodes.support_y, episodes.query_x, episodes.query_y)
    learner = MAML(
        mlp(hidden=4), inner_lr=0.05, inner_steps=3, compile=False, inner_optimizer=INNER[opt]()
    )
    meta = learner.meta_parameters()
    _, grads = meta_gradient(learner, meta, data)

    def objective(key, value):
        flat = dict(tree_flatten(meta))
        flat[key] = mx.array(value.astype(np.float32))
        (loss, _, _), _ = meta_gradient(learner, tree_unflatten(list(flat.items())), data)
        return loss.item()

    eps = 1e-3
    for key, grad in tree_flatten(grads):
        value = np.array(dict(tree_flatten(meta))[key]).astype(np.float64)
        for idx in [(0,) * value.ndim, tuple(s - 1 for s in value.shape)]:
            up, down = value.copy(), value.copy()
            up[idx] += eps
            down[idx] -= eps
            fd = (objective(key, up) - objective(key, down)) / (2 * eps)
            assert np.array(grad)[idx] == pytest.approx(fd, rel=2e-2, abs=2e-3), (key, idx)


def test_inner_adam_first_step_has_the_learning_rate_as_size():
    opt = inner.adam()
    params = {"w": mx.array([1.0, -2.0, 0.0])}
    new, state = opt.update(params, {"w": mx.array([3.0, -0.5, 0.0])}, opt.init(params), 0.1)
    np.testing.assert_allclose(np.array(new["w"]), [0.9, -1.9, 0.0], rtol=1e-5)
    assert state["count"].item() == 1


def test_inner_optimizers_reject_bad_settings():
    with pytest.raises(ValueError, match="beta"):
        inner.momentum(1.0)
    with pytest.raises(ValueError, match="b2"):
        inner.adam(b2=-0.1)
    with pytest.raises(ValueError, match="eps"):
        inner.adam(eps=float("nan"))
    with pytest.raises(TypeError, match="inner_optimizer"):
        MAML(mlp(), inner_optimizer=optim.Adam(1e-3))


@pytest.mark.parametrize("name", list(LEARNERS))
@pytest.mark.parametrize("bad_step", [1, 2])
def test_a_non_finite_step_changes_nothing_and_the_next_one_works(name, bad_step):
    """Parameters and optimizer state stay exactly as they were (also on the very first
    step, before the optimizer state existed), and training then goes on as if the
    bad step had never been tried."""
    episodes = sinusoid_episodes()
    bad = SimpleNamespace(**{**vars(episodes), "query_y": episodes.query_y * float("nan")})
    learner, clean = LEARNERS[name](mlp()), LEARNERS[name](mlp())
    for _ in range(bad_step - 1):
        learner.meta_train_step(episodes, mse)
        clean.meta_train_step(episodes, mse)
    before = flat_numpy(learner.meta_parameters())
    state_before = flat_numpy(learner.optimizer.state if learner.optimizer else {})
    with pytest.raises(FloatingPointError, match=f"meta-step {bad_step}"):
        learner.meta_train_step(bad, mse)
    after = flat_numpy(learner.meta_parameters())
    assert all(np.array_equal(before[k], after[k]) for k in before)
    if learner.optimizer is not None:
        state_after = flat_numpy(learner.optimizer.state)
        assert state_after.keys() == state_before.keys()
        assert all(np.array_equal(state_before[k], state_after[k]) for k in state_before)
    assert learner.step == bad_step - 1
    learner.meta_train_step(episodes, mse)
    clean.meta_train_step(episodes, mse)
    assert max_diff(learner.meta_parameters(), clean.meta_parameters()) == 0.0


def test_a_non_finite_update_with_a_finite_loss_is_refused():
    """An outer step that overflows (here a huge outer learning rate) is caught on the
    new parameters, not only on the losses."""
    learner = MAML(mlp(), optim.SGD(1e38), inner_lr=0.05)
    with pytest.raises(FloatingPointError, match="meta-parameters"):
        learner.meta_train_step(sinusoid_episodes(), mse)
    assert learner.step == 0


def test_the_compiled_step_keeps_no_old_loss_function():
    """A new loss function per call (a lambda) replaces the compiled step: the old one
    is let go, so the cache does not grow."""
    learner = MAML(mlp(), inner_lr=0.05)
    episodes = sinusoid_episodes()
    refs = []
    for _ in range(3):
        fn = lambda m, x, y: mse(m, x, y)  # noqa: E731
        refs.append(weakref.ref(fn))
        learner.meta_train_step(episodes, fn)
        del fn
    gc.collect()
    assert [r() is None for r in refs] == [True, True, False]


def test_evaluate_maps_tasks_as_the_learner_does():
    """batched=False evaluates one task at a time (the loss is traced once per task),
    with the same numbers as all at once."""
    episodes = sinusoid_episodes(tasks=3)
    out = {}
    for batched in (True, False):
        calls = []

        def counted(m, x, y, calls=calls):
            calls.append(1)
            return mse(m, x, y)

        learner = MAML(mlp(), inner_lr=0.05, batched=batched)
        out[batched] = (learner.evaluate(episodes, steps=2, loss_fn=counted), len(calls))
    assert out[False][1] == 3 * out[True][1]
    np.testing.assert_allclose(
        out[True][0]["query_losses"], out[False][0]["query_losses"], rtol=1e-5
    )


def test_param_diff_counts_leaves_only_not_empty_containers():
    """A model's trainable parameters carry empty containers (a LoRA layer's
    ``dropout: {}``) that trees rebuilt from paths lack; the distance the inner loop
    moved is over the leaves alone, as ``tree_flatten`` lists them."""
    meta = {"layers": [{"dropout": {}, "w": mx.ones((2, 3))}, {}, {"w": mx.zeros((3,))}]}
    adapted = tree_unflatten([("layers.0.w", mx.zeros((2, 3))), ("layers.2.w", mx.ones((3,)))])
    assert core.tree_distance(adapted, meta).item() == pytest.approx(3.0)
    per_task = mx.vmap(core.tree_distance, in_axes=(0, None))(
        tree_unflatten([("layers.0.w", mx.zeros((4, 2, 3))), ("layers.2.w", mx.ones((4, 3)))]),
        meta,
    )
    np.testing.assert_allclose(np.array(per_task), 3.0)


def test_the_registry_builds_every_algorithm_with_its_outer_step():
    assert set(ALGORITHMS) >= {"maml", "fomaml", "metasgd", "reptile"}
    for name, cls in ALGORITHMS.items():
        learner = build_learner(name, mlp(), outer_lr=0.05, inner_lr=0.02)
        assert type(learner) is cls and learner.name == name
        if name == "reptile":
            assert learner.optimizer is None and learner.epsilon == 0.05
        else:
            assert learner.optimizer.learning_rate.item() == pytest.approx(0.05)
    with pytest.raises(ValueError, match="unknown algorithm 'sgd'.*maml"):
        get_algorithm("sgd")


def test_importing_metapeft_loads_no_application_layer():
    code = (
        "import sys, metapeft, metapeft.ops, metapeft.learners, metapeft.nn, metapeft.tasks\n"
        "heavy = ['pydantic', 'typer', 'rich', 'matplotlib', 'mlflow', 'yaml']\n"
        "print([m for m in heavy if m in sys.modules])\n"
        "metapeft.MAML, metapeft.MetaLearningConfig\n"
        "print('pydantic' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.split("\n")[:2] == ["[]", "True"], out.stdout + out.stderr
