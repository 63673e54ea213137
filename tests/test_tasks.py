"""metapeft.tasks: task configs, families, distributions, episodes and JSON loading."""

import json
import math
import sys

import mlx.core as mx
import numpy as np
import pytest

from metapeft.tasks import (
    Episodes,
    TaskConfig,
    TaskDistribution,
    digits_classes,
    digits_data,
    get_family,
    known_families,
    load_task_configs,
    register_family,
    registry,
)
from metapeft.tasks import digits as digits_module

SPLITS = ("train", "val", "test")


def sine(task_id="sine", support=10, query=15, **params):
    return TaskConfig(task_id, "sinusoid", 0, 1, support, query, params)


def digit(task_id="digits", n=5, k=1, q=3, **params):
    return TaskConfig(task_id, "digits", n, 64, n * k, n * q, params)


def to_np(episodes):
    return [np.array(a) for a in (*episodes.support, *episodes.query)]


def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(to_np(a), to_np(b), strict=True))


def sine_fit(x, y):
    """Amplitude and phase of ``y = A sin(x - phase)`` through the points (exact fit)."""
    basis = np.stack([np.sin(x), np.cos(x)], axis=1).astype(np.float64)
    (a, b), *_ = np.linalg.lstsq(basis, y.astype(np.float64), rcond=None)
    return math.hypot(a, b), math.atan2(-b, a)


# ---------------------------------------------------------------------------- Episodes


def episode_arrays(t=3, s=4, q=6, d=2):
    rng = np.random.default_rng(0)
    return [
        rng.normal(size=(t, s, d)).astype(np.float32),
        rng.integers(0, 3, size=(t, s)).astype(np.int32),
        rng.normal(size=(t, q, d)).astype(np.float32),
        rng.integers(0, 3, size=(t, q)).astype(np.int32),
    ]


def test_episodes_from_numpy_converts_and_indexes():
    arrays = episode_arrays()
    e = Episodes(*arrays)
    assert all(isinstance(a, mx.array) for a in (e.support_x, e.support_y, e.query_x, e.query_y))
    assert e.num_tasks == 3
    assert e.support_x.shape == (3, 4, 2) and e.query_y.shape == (3, 6)
    assert e.support_y.dtype == mx.int32
    one = e.task(1)
    assert one.num_tasks == 1 and one.support_x.shape == (1, 4, 2) and one.query_y.shape == (1, 6)
    for got, full in zip(to_np(one), arrays, strict=True):
        np.testing.assert_array_equal(got, full[1:2])
    assert same(e.task(-1), e.task(2))
    tasks = list(e.tasks())
    assert len(tasks) == 3 and all(same(t, e.task(i)) for i, t in enumerate(tasks))
    x, y = e.support
    assert x is e.support_x and y is e.support_y and e.query[1] is e.query_y


def test_episodes_keeps_mx_arrays_and_is_frozen():
    x = mx.zeros((2, 3, 1))
    e = Episodes(x, x, mx.zeros((2, 5, 1)), mx.zeros((2, 5, 1)))
    assert e.support_x is x
    with pytest.raises(AttributeError):
        e.support_x = x


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(enumerate(a[:0] for a in episode_arrays())), ValueError, r"no tasks: T is 0"),
        ({1: np.zeros((3,))}, ValueError, r"support_y must have rank >= 2.*\(3,\)"),
        ({2: np.zeros((2, 6, 2))}, ValueError, r"number of tasks T.*query_x \(2, 6, 2\)"),
        ({1: np.zeros((3, 5))}, ValueError, r"support_x and support_y disagree.*\(3, 5\)"),
        ({3: np.zeros((3, 7))}, ValueError, r"query_x and query_y disagree.*\(3, 7\)"),
        ({2: np.zeros((3, 6, 3))}, ValueError, r"support_x and query_x disagree.*\(3, 6, 3\)"),
        ({0: [[1.0]]}, TypeError, r"support_x must be an mx.array or a numpy array, got list"),
    ],
    ids=["no-tasks", "rank", "num-tasks", "support-count", "query-count", "features", "type"],
)
def test_episodes_rejects_bad_arrays(change, error, match):
    arrays = episode_arrays()
    for i, a in change.items():
        arrays[i] = a
    with pytest.raises(error, match=match):
        Episodes(*arrays)


def test_episodes_task_index_errors():
    e = Episodes(*episode_arrays())
    with pytest.raises(IndexError, match=r"task index 3 out of range for 3 tasks"):
        e.task(3)
    with pytest.raises(IndexError, match=r"-4"):
        e.task(-4)
    with pytest.raises(TypeError, match=r"task index must be an int"):
        e.task(1.0)


# ---------------------------------------------------------------------------- TaskConfig


def test_task_config_fields_and_copies():
    params = {"amplitude_range": [1.0, 2.0]}
    config = TaskConfig("s", "sinusoid", 0, 1, 5, 7, params)
    params["amplitude_range"][0] = 99.0
    assert config.task_params == {"amplitude_range": [1.0, 2.0]}
    assert TaskConfig.from_dict(config.to_dict()) == config
    assert json.loads(json.dumps(config.to_dict()))["query_size"] == 7
    assert TaskConfig("d", "digits", 5, 64, 5, 75).task_params == {}
    assert known_families() == ("digits", "sinusoid")
    assert get_family("digits").classification and not get_family("sinusoid").classification


@pytest.mark.parametrize(
    "args, error, match",
    [
        (("s", "sinusoid", 0, 1, 0, 5), ValueError, r"support_size must be >= 1, got 0"),
        (("s", "sinusoid", 0, 1, 5, 0), ValueError, r"query_size must be >= 1, got 0"),
        (("s", "sinusoid", 0, 0, 5, 5), ValueError, r"input_dim must be >= 1, got 0"),
        (("s", "sinusoid", -1, 1, 5, 5), ValueError, r"num_classes must be >= 0, got -1"),
        (("s", "sinusoid", 0, 1, "5", 5), TypeError, r"support_size must be an int, got str"),
        (("s", "sinusoid", 0, 1, 5.0, 5), TypeError, r"support_size must be an int, got float"),
        (("s", "sinusoid", 0, True, 5, 5), TypeError, r"input_dim must be an int, got bool"),
        ((7, "sinusoid", 0, 1, 5, 5), TypeError, r"task_id must be a non-empty str"),
        (("s", "", 0, 1, 5, 5), TypeError, r"task_family must be a non-empty str"),
        (("s", "sinusoid", 0, 1, 5, 5, [1]), TypeError, r"task_params must be a dict"),
        (
            ("s", "omniglot", 5, 1, 5, 5),
            ValueError,
            r"unknown task_family 'omniglot'; known families: digits, sinusoid",
        ),
        (("s", "sinusoid", 2, 1, 5, 5), ValueError, r"num_classes must be 0 or 1 for regression"),
        (("s", "sinusoid", 0, 2, 5, 5), ValueError, r"sinusoid task 's': input_dim must be 1"),
        (
            ("s", "sinusoid", 0, 1, 5, 5, {"amp": [1, 2]}),
            ValueError,
            r"unknown task_params \['amp'\]; known: amplitude_range, phase_range, x_range",
        ),
        (
            ("s", "sinusoid", 0, 1, 5, 5, {"x_range": [2, 1]}),
            ValueError,
            r"task_params\['x_range'\] must have low <= high",
        ),
        (
            ("s", "sinusoid", 0, 1, 5, 5, {"phase_range": [0]}),
            ValueError,
            r"task_params\['phase_range'\] must be \[low, high\]",
        ),
        (
            ("s", "sinusoid", 0, 1, 5, 5, {"amplitude_range": [0, "5"]}),
            ValueError,
            r"task_params\['amplitude_range'\] must hold two finite numbers",
        ),
        (
            ("s", "sinusoid", 0, 1, 5, 5, {"amplitude_range": [0, math.inf]}),
            ValueError,
            r"two finite numbers",
        ),
        (
            ("d", "digits", 5, 64, 7, 75),
            ValueError,
            r"support_size=7 must be a multiple of num_classes=5",
        ),
        (
            ("d", "digits", 5, 64, 5, 12),
            ValueError,
            r"query_size=12 must be a multiple of num_classes=5",
        ),
        (("d", "digits", 1, 64, 5, 5), ValueError, r"num_classes must be >= 2 for classif"),
        (("d", "digits", 5, 10, 5, 5), ValueError, r"digits task 'd': input_dim must be 64"),
        (
            ("d", "digits", 5, 64, 5, 5, {"split": "dev"}),
            ValueError,
            r"task_params\['split'\] must be one of \('train', 'val', 'test'\), got 'dev'",
        ),
        (
            ("d", "digits", 5, 64, 5, 5, {"shots": 1}),
            ValueError,
            r"unknown task_params \['shots'\]; known: split",
        ),
    ],
)
def test_task_config_rejects_bad_values(args, error, match):
    with pytest.raises(error, match=match):
        TaskConfig(*args)


def test_task_config_from_dict_names_the_field():
    good = sine().to_dict()
    with pytest.raises(ValueError, match=r"missing field 'query_size'"):
        TaskConfig.from_dict({k: v for k, v in good.items() if k != "query_size"})
    with pytest.raises(ValueError, match=r"unknown field 'shots'"):
        TaskConfig.from_dict({**good, "shots": 1})
    with pytest.raises(TypeError, match=r"a task must be a dict"):
        TaskConfig.from_dict([good])


# ---------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("family", ["sinusoid", "digits"])
def test_shapes_and_dtypes(family):
    if family == "sinusoid":
        config, y_dtype = sine(support=10, query=15), mx.float32
        shapes = [(7, 10, 1), (7, 10, 1), (7, 15, 1), (7, 15, 1)]
    else:
        config, y_dtype = digit(n=5, k=2, q=3), mx.int32
        shapes = [(7, 10, 64), (7, 10), (7, 15, 64), (7, 15)]
    tasks = TaskDistribution(config, seed=3)
    e = tasks.sample(7)
    assert isinstance(e, Episodes) and e.num_tasks == 7
    got = [e.support_x, e.support_y, e.query_x, e.query_y]
    assert [a.shape for a in got] == shapes
    assert [a.dtype for a in got] == [mx.float32, y_dtype, mx.float32, y_dtype]
    assert tasks.family == family and tasks.seed == 3
    assert (tasks.support_size, tasks.query_size) == (config.support_size, config.query_size)


@pytest.mark.parametrize("config", [sine(), digit()], ids=["sinusoid", "digits"])
def test_sampling_is_deterministic_for_a_seed(config):
    a, b, c = (TaskDistribution(config, seed=s) for s in (5, 5, 6))
    first_a, first_b = a.sample(4), b.sample(4)
    assert same(first_a, first_b)
    assert same(a.sample(3), b.sample(3))
    assert not same(first_a, c.sample(4))
    assert not same(first_a, a.sample(4))  # successive meta-batches differ


@pytest.mark.parametrize("config", [sine(), digit()], ids=["sinusoid", "digits"])
def test_rng_state_round_trip(config):
    tasks = TaskDistribution(config, seed=11)
    tasks.sample(2)
    state = json.loads(json.dumps(tasks.rng_state()))
    expected = [tasks.sample(3), tasks.sample(2)]
    resumed = TaskDistribution(config, seed=999)
    resumed.set_rng_state(state)
    assert same(resumed.sample(3), expected[0]) and same(resumed.sample(2), expected[1])
    tasks.set_rng_state(state)  # rewinding the same distribution works too
    assert same(tasks.sample(3), expected[0])
    state["bit_generator"] = "MT19937"
    with pytest.raises(ValueError, match=r"rng state must be a dict from rng_state\(\)"):
        tasks.set_rng_state(state)
    with pytest.raises(ValueError, match=r"rng state"):
        tasks.set_rng_state([1, 2])
    with pytest.raises(ValueError, match=r"invalid rng state"):
        tasks.set_rng_state({"bit_generator": "PCG64", "state": "oops"})


def test_sinusoid_parameters_stay_in_their_ranges():
    e = TaskDistribution(sine(support=10, query=10), seed=0).sample(400)
    x = np.concatenate([np.array(e.support_x), np.array(e.query_x)], axis=1)[..., 0]
    y = np.concatenate([np.array(e.support_y), np.array(e.query_y)], axis=1)[..., 0]
    assert x.min() >= -5.0 and x.max() <= 5.0
    assert x.min() < -4.9 and x.max() > 4.9
    fits = np.array([sine_fit(xi, yi) for xi, yi in zip(x, y, strict=True)])
    amplitude, phase = fits[:, 0], fits[:, 1]
    assert np.all(np.abs(y) <= amplitude[:, None] * (1 + 1e-4) + 1e-5)  # |y / A| <= 1
    assert amplitude.min() >= 0.1 - 1e-4 and amplitude.max() <= 5.0 + 1e-4
    assert phase.min() >= -1e-4 and phase.max() <= math.pi + 1e-4
    # the draws spread over the ranges (a uniform of 400 draws reaches near both ends)
    assert amplitude.min() < 0.3 and amplitude.max() > 4.8
    assert phase.min() < 0.1 and phase.max() > math.pi - 0.1


def test_sinusoid_ranges_from_task_params():
    config = sine(amplitude_range=[2.0, 2.0], phase_range=[0.5, 0.5], x_range=[0.0, 1.0])
    e = TaskDistribution(config, seed=1).sample(20)
    x, y = np.array(e.support_x), np.array(e.support_y)
    assert x.min() >= 0.0 and x.max() <= 1.0
    np.testing.assert_allclose(y, 2.0 * np.sin(x - 0.5), rtol=1e-5, atol=1e-6)


def test_several_configs_are_mixed_uniformly():
    configs = [sine("low", amplitude_range=[1, 1]), sine("high", amplitude_range=[3, 3])]
    e = TaskDistribution(configs, seed=0).sample(200)
    x, y = np.array(e.support_x)[..., 0], np.array(e.support_y)[..., 0]
    amplitude = np.array([sine_fit(xi, yi)[0] for xi, yi in zip(x, y, strict=True)])
    low, high = np.isclose(amplitude, 1, atol=1e-3), np.isclose(amplitude, 3, atol=1e-3)
    assert np.all(low | high)
    assert 70 <= low.sum() <= 130  # binomial(200, 1/2): mean 100, sd 7


@pytest.mark.parametrize(
    "configs, match",
    [
        (
            [sine("a"), sine("b", support=5)],
            r"disagree on support_size: task 'a' has 10, task 'b' has 5",
        ),
        ([sine("a"), sine("b", query=5)], r"disagree on query_size: task 'a' has 15"),
        ([sine("a"), digit("b")], r"disagree on task_family: task 'a' has 'sinusoid', task 'b'"),
        ([digit("a", n=5), digit("b", n=3, k=5, q=5)], r"disagree on num_classes: task 'a'"),
        ([sine("a"), sine("a")], r"task_id 'a' repeats \(configs\[0\] and configs\[1\]\)"),
        ([], r"configs is empty"),
        (digit("big", n=7, split="val"), r"num_classes=7 but split 'val' has only 6 classes"),
        (
            digit("many", n=2, k=100, q=80),
            r"each class needs 100 support \+ 80 query = 180 images, "
            r"but class '.*' of split 'train' has only 17\d",
        ),
    ],
)
def test_distribution_rejects_bad_configs(configs, match):
    with pytest.raises(ValueError, match=match):
        TaskDistribution(configs)


def test_distribution_rejects_bad_arguments():
    with pytest.raises(TypeError, match=r"configs\[1\] must be a TaskConfig, got dict"):
        TaskDistribution([sine(), sine().to_dict()])
    with pytest.raises(TypeError, match=r"configs must be a TaskConfig or a sequence"):
        TaskDistribution("sine")
    with pytest.raises(ValueError, match=r"seed must be >= 0, got -1"):
        TaskDistribution(sine(), seed=-1)
    with pytest.raises(TypeError, match=r"seed must be an int, got float"):
        TaskDistribution(sine(), seed=1.5)
    tasks = TaskDistribution(sine())
    with pytest.raises(ValueError, match=r"num_tasks must be >= 1, got 0"):
        tasks.sample(0)
    with pytest.raises(TypeError, match=r"num_tasks must be an int, got str"):
        tasks.sample("4")
    assert "sinusoid" in repr(tasks) and "'sine'" in repr(tasks)


# ---------------------------------------------------------------------------- user families


@pytest.fixture
def scratch_registry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_register_family(scratch_registry):
    def lines(config, rng):
        slope = rng.uniform(-1, 1)
        x = rng.uniform(-1, 1, (config.support_size + config.query_size, config.input_dim))
        y = slope * x.sum(1, keepdims=True)
        k = config.support_size
        return x[:k], y[:k], x[k:], y[k:]

    seen = []
    register_family("lines", lines, validate=seen.append)
    config = TaskConfig("l", "lines", 0, 3, 4, 6)
    assert seen == [config]
    e = TaskDistribution(config, seed=0).sample(2)
    assert e.support_x.shape == (2, 4, 3) and e.query_y.shape == (2, 6, 1)
    assert e.support_x.dtype == mx.float32 and e.support_y.dtype == mx.float32  # cast
    assert "lines" in known_families()
    with pytest.raises(ValueError, match=r"task family 'lines' is already registered"):
        register_family("lines", lines)
    register_family("lines", lines, replace=True)
    with pytest.raises(TypeError, match=r"sample must be callable, got int"):
        register_family("other", 3)
    with pytest.raises(TypeError, match=r"prepare must be callable, got str"):
        register_family("other", lines, prepare="no")
    with pytest.raises(ValueError, match=r"family name must be a non-empty string"):
        register_family("", lines)


def test_a_family_returning_bad_arrays_is_named(scratch_registry):
    def wrong_shape(config, rng):
        x = np.zeros((config.support_size + 1, config.input_dim))
        return x, np.zeros((len(x), 1)), x, np.zeros((len(x), 1))

    def bad_labels(config, rng):
        x = np.zeros((config.support_size, config.input_dim))
        return x, np.full(len(x), config.num_classes), x, np.zeros(len(x), dtype=int)

    def float_labels(config, rng):
        x = np.zeros((config.support_size, config.input_dim))
        return x, np.zeros(len(x)), x, np.zeros(len(x))

    register_family("wrong", wrong_shape)
    register_family("labels", bad_labels, classification=True)
    register_family("floats", float_labels, classification=True)
    with pytest.raises(
        ValueError,
        match=r"family 'wrong' \(task 'w'\) returned support_x of "
        r"shape \(5, 2\), expected \(4, 2\)",
    ):
        TaskDistribution(TaskConfig("w", "wrong", 0, 2, 4, 4)).sample(1)
    with pytest.raises(ValueError, match=r"support_y with labels outside 0..1"):
        TaskDistribution(TaskConfig("b", "labels", 2, 2, 4, 4)).sample(1)
    with pytest.raises(ValueError, match=r"support_y of dtype float64, not integer"):
        TaskDistribution(TaskConfig("f", "floats", 2, 2, 4, 4)).sample(1)


# ---------------------------------------------------------------------------- digits


DROPPED = {"0@180", "1@180", "8@180", "0@270", "1@270", "8@270"}


def test_digits_classes_after_collisions():
    data = digits_module._dataset()
    assert len(data.candidates) == 40
    assert set(data.candidates) - set(data.names) == DROPPED
    assert len(data.names) == 34
    # Each dropped candidate collides with a class kept before it; kept ones never collide.
    index = {name: i for i, name in enumerate(data.candidates)}
    kept = [index[n] for n in data.names]
    threshold = digits_module.COLLISION_ERROR
    assert data.errors[np.ix_(kept, kept)].max() < threshold
    for name in DROPPED:
        c = index[name]
        assert max(data.errors[c, k] for k in kept if k < c) >= threshold
    # The threshold sits in a wide gap of the measured errors.
    errors = data.errors[np.triu_indices(40, 1)]
    assert not np.any((errors > 0.045) & (errors < 0.10))
    assert data.errors[index["6@180"], index["9@0"]] < 0.01  # a turned 6 is not a 9 here


def test_digits_splits_are_disjoint_and_documented():
    classes = {s: digits_classes(s) for s in SPLITS}
    assert {s: len(c) for s, c in classes.items()} == {"train": 20, "val": 6, "test": 8}
    assert set(classes["train"]) == {f"{d}@{r}" for d in (2, 4, 6, 7, 9) for r in (0, 90, 180, 270)}
    assert classes["val"] == ("5@0", "8@0", "5@90", "8@90", "5@180", "5@270")
    assert set(classes["test"]) == {"0@0", "1@0", "3@0", "0@90", "1@90", "3@90", "3@180", "3@270"}
    all_classes = [c for s in SPLITS for c in classes[s]]
    assert len(set(all_classes)) == len(all_classes) == 34
    # whole digits go to one split: no test digit appears, turned or not, in train
    digits_of = {s: {c.split("@")[0] for c in classes[s]} for s in SPLITS}
    assert not (digits_of["train"] & digits_of["val"] or digits_of["train"] & digits_of["test"])
    assert not digits_of["val"] & digits_of["test"]
    with pytest.raises(ValueError, match=r"digits split must be one of train, val, test; got 'x'"):
        digits_classes("x")


def test_digits_rotations_rotate():
    from sklearn.datasets import load_digits

    raw = load_digits()
    x, y = digits_data("train")
    names = digits_classes("train")
    assert x.dtype == np.float32 and y.dtype == np.int32 and x.shape == (len(y), 64)
    assert x.min() == 0.0 and x.max() == 1.0
    upright = (raw.images[raw.target == 2] / 16.0).astype(np.float32)
    for degrees in (0, 90, 180, 270):
        got = x[y == names.index(f"2@{degrees}")].reshape(-1, 8, 8)
        np.testing.assert_array_equal(got, np.rot90(upright, degrees // 90, axes=(1, 2)))
    # counterclockwise, by hand: the top row of a 90-degree turn is the right column
    turned = x[y == names.index("2@90")].reshape(-1, 8, 8)
    np.testing.assert_array_equal(turned[:, 0, :], upright[:, :, 7])
    np.testing.assert_array_equal(turned[:, :, 0], upright[:, 0, ::-1])
    assert not np.array_equal(turned, upright)


def class_of_image(split):
    x, y = digits_data(split)
    names = digits_classes(split)
    return {row.tobytes(): names[label] for row, label in zip(x, y, strict=True)}


@pytest.mark.parametrize("split", SPLITS)
def test_digits_episodes(split):
    n, k, q = 5, 3, 4
    e = TaskDistribution(digit(n=n, k=k, q=q, split=split), seed=2).sample(30)
    sx, sy, qx, qy = to_np(e)
    lookup = class_of_image(split)
    label_zero = set()
    for t in range(e.num_tasks):
        assert sorted(sy[t]) == sorted(np.repeat(np.arange(n), k))  # labels 0..N-1, K each
        assert sorted(qy[t]) == sorted(np.repeat(np.arange(n), q))
        support = {row.tobytes() for row in sx[t]}
        query = {row.tobytes() for row in qx[t]}
        assert len(support) == n * k and len(query) == n * q  # no repeats
        assert not support & query  # no image in both
        # every image is from the split, each label is one class, labels are distinct classes
        label_class = {}
        for xs, ys in ((sx[t], sy[t]), (qx[t], qy[t])):
            for row, label in zip(xs, ys, strict=True):
                name = lookup[row.tobytes()]
                assert label_class.setdefault(label, name) == name
        assert len(set(label_class.values())) == n
        label_zero.add(label_class[0])
    assert len(label_zero) > 2  # classes are relabelled per task
    assert not np.array_equal(sy[0], np.sort(sy[0]))  # support is shuffled


def test_digits_needs_scikit_learn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r'pip install "metapeft\[digits\]"'):
        digits_module._load_images()


# ---------------------------------------------------------------------------- JSON


def write(tmp_path, data, name="tasks.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_load_task_configs(tmp_path):
    configs = [sine("a", amplitude_range=[1.0, 2.0]), digit("b", split="val")]
    dicts = [c.to_dict() for c in configs]
    assert load_task_configs(write(tmp_path, dicts)) == configs
    assert load_task_configs(str(write(tmp_path, {"tasks": dicts}))) == configs
    minimal = {k: v for k, v in sine().to_dict().items() if k != "task_params"}
    assert load_task_configs(write(tmp_path, [minimal]))[0].task_params == {}


def test_load_task_configs_bad_files(tmp_path):
    good = sine("s").to_dict()
    cases = [
        ("{not json", r"not valid JSON: .*line 1"),
        ({"task": [good]}, r"expected a list of tasks or an object with only a 'tasks' list"),
        ({"tasks": [good], "seed": 1}, r"only a 'tasks' list; got an object with keys"),
        ('"sine"', r"expected a list of tasks, got str"),
        ([], r"no tasks"),
        ([good, 3], r"task 1: expected an object, got int"),
        ([good, {**good, "task_id": "t", "shots": 1}], r"task 1 \('t'\): unknown field 'shots'"),
        (
            [{k: v for k, v in good.items() if k != "input_dim"}],
            r"task 0 \('s'\): missing field 'input_dim'",
        ),
        ([{**good, "support_size": "10"}], r"task 0 \('s'\): support_size must be an int, got str"),
        ([{**good, "support_size": 10.0}], r"support_size must be an int, got float"),
        ([{**good, "query_size": -1}], r"task 0 \('s'\): query_size must be >= 1, got -1"),
        ([{**good, "task_family": "mnist"}], r"unknown task_family 'mnist'"),
        ([{**good, "task_id": 5}], r"task 0: task_id must be a non-empty str, got 5"),
        ([good, good], r"task 1 \('s'\): task_id 's' repeats task 0"),
    ]
    for i, (data, match) in enumerate(cases):
        path = write(tmp_path, data, f"bad{i}.json")
        with pytest.raises(ValueError, match=match) as info:
            load_task_configs(path)
        assert str(path) in str(info.value), info.value
    with pytest.raises(FileNotFoundError):
        load_task_configs(tmp_path / "missing.json")
