"""ANIL through the public API: it meta-learns sinusoid regression with only the head
adapting in the inner loop, adapt() changes only the head, and it serves every path
the registry serves."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten
from test_learners import max_diff, mlp, mse, sinusoid_episodes

from metapeft import ANIL, TaskConfig, TaskDistribution
from metapeft.learners import ALGORITHMS


def sinusoid_net(seed=0):
    mx.random.seed(seed)
    return nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )


def test_anil_meta_learns_sinusoid_and_adapts_only_the_head():
    config = TaskConfig("sine", "sinusoid", 0, 1, support_size=10, query_size=10)
    train, held_out = TaskDistribution(config, seed=0), TaskDistribution(config, seed=1)
    test_tasks = held_out.sample(100)
    untrained = ANIL(sinusoid_net(), inner_lr=0.01, loss_fn=mse)
    before = untrained.evaluate(test_tasks, steps=10)["query_loss"]
    learner = ANIL(sinusoid_net(), optim.Adam(3e-3), inner_lr=0.01, loss_fn=mse)
    assert learner.head == ("layers.4",)
    for _ in range(300):
        learner.meta_train_step(train.sample(25))
    after = learner.evaluate(test_tasks, steps=10)["query_loss"]
    assert after < 0.5 * before, (before, after)

    meta = dict(tree_flatten(learner.meta_parameters()["params"]))
    adapted = dict(tree_flatten(learner.adapt(test_tasks.support_x[0], test_tasks.support_y[0])))
    changed = {k for k in meta if not mx.array_equal(meta[k], adapted[k])}
    assert changed == {"layers.4.weight", "layers.4.bias"}


def test_anil_outer_loop_trains_the_body_too():
    learner = ANIL(mlp(), optim.Adam(1e-2), inner_lr=0.05)
    before = dict(tree_flatten(learner.meta_parameters()))
    learner.meta_train_step(sinusoid_episodes(), mse)
    after = dict(tree_flatten(learner.meta_parameters()))
    assert all(not mx.array_equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("inner_steps", [1, 3])
def test_anil_batched_matches_one_task_at_a_time(inner_steps):
    episodes = sinusoid_episodes()
    results = []
    for batched in (True, False):
        learner = ANIL(mlp(), optim.Adam(1e-2), inner_lr=0.05, inner_steps=inner_steps)
        learner.batched = batched
        results.append((learner.meta_train_step(episodes, mse), learner.meta_parameters()))
    assert max_diff(results[0][1], results[1][1]) < 1e-5


def test_anil_head_can_be_named_and_bad_heads_are_refused():
    learner = ANIL(mlp(), head=["layers.0"])
    params = learner.meta_parameters()["params"]
    assert learner.inner_keys(params) == {"layers.0.weight", "layers.0.bias"}
    with pytest.raises(ValueError, match="head.*classifier"):
        ANIL(mlp(), head=["classifier"])
    with pytest.raises(TypeError, match="sequence of module paths"):
        ANIL(mlp(), head="layers.2")


def test_anil_is_registered():
    assert ALGORITHMS["anil"] is ANIL
