"""asv: the fused primitives against their pure-MLX references."""

import mlx.core as mx

from metapeft import ops, reference
from metapeft.bench import problems
from metapeft.bench import runner as bench_runner
from metapeft.bench.problems import size

IMPLS = ["fused", "reference"]


class Linear:
    """``linear`` on a square problem, ``x (d, d) @ weight.T``."""

    params = (IMPLS, size([256, 1024], [8]), ["float32", "float16"])
    param_names = ["impl", "width", "dtype"]

    def setup(self, impl, width, dtype):
        self.x, self.w = problems.linear_problem(width, width, dtype)
        self.f = (ops if impl == "fused" else reference).linear
        grad = mx.grad(lambda x, w: self.f(x, w).astype(mx.float32).sum(), argnums=(0, 1))
        self.grad = lambda: grad(self.x, self.w)
        mx.eval(self.f(self.x, self.w), self.grad())

    def time_forward(self, *_):
        mx.eval(self.f(self.x, self.w))

    def time_forward_backward(self, *_):
        mx.eval(self.grad())


class LoRALinear:
    """``lora_linear`` with one adapter or one per task (64 rows per task, d=1024)."""

    params = (IMPLS, ["single", "per-task"], size([4, 16], [2]), size([8, 32], [2]))
    param_names = ["impl", "adapters", "tasks", "rank"]

    def setup(self, impl, adapters, tasks, rank):
        rows, dim = size((64, 1024), (4, 16))
        if adapters == "single":
            p = problems.lora_problem(0, tasks * rows, dim, rank)
        else:
            p = problems.lora_problem(tasks, rows, dim, rank)
        self.forward = problems.lora_forward(impl, p)
        self.forward_backward = problems.lora_forward_backward(impl, p)
        mx.eval(self.forward(), self.forward_backward())

    def time_forward(self, *_):
        mx.eval(self.forward())

    def time_forward_backward(self, *_):
        mx.eval(self.forward_backward())


UPDATE_PARAMS = (
    ["fused", "fused compiled", "reference compiled", "reference"],
    list(problems.TREES),
    size([5, 25, 100], [2]),
    ["float32", "bfloat16"],
)


class TaskSGD:
    """``task_sgd`` over a tree of :data:`metapeft.bench.problems.TREES`."""

    params = UPDATE_PARAMS
    param_names = ["impl", "tree", "tasks", "dtype"]

    def setup(self, impl, tree, tasks, dtype):
        p = problems.update_problem(tasks, tree, dtype)
        self.fn, self.params, self.grads = problems.task_sgd_fn(impl), p["params"], p["grads"]
        mx.eval(self.fn(self.params, self.grads))

    def time_task_sgd(self, *_):
        mx.eval(self.fn(self.params, self.grads))


class ReptileUpdate:
    """``reptile_update`` of one meta-parameter tree from ``tasks`` adapted ones."""

    params = UPDATE_PARAMS
    param_names = ["impl", "tree", "tasks", "dtype"]

    def setup(self, impl, tree, tasks, dtype):
        p = problems.update_problem(tasks, tree, dtype)
        self.fn, self.meta, self.adapted = problems.reptile_update_fn(impl), p["meta"], p["params"]
        mx.eval(self.fn(self.meta, self.adapted))

    def time_reptile_update(self, *_):
        mx.eval(self.fn(self.meta, self.adapted))


class LinearCrossEntropy:
    """A language model's loss from its last hidden states and tied output layer, and
    the loss's gradient with respect to the hidden states: SmolLM2-135M's head (256
    rows, d=576, a 49,152-word vocabulary), its logits about 1 or about 24 apart (a
    random head's spread, and a wide one's). ``fused`` is ``linear_cross_entropy``,
    ``unfused`` the same BLAS product and fused loss with the logits held
    (``linear``, then ``cross_entropy``)."""

    params = (["fused", "unfused"], [1.0, 24.0])
    param_names = ["impl", "logit_spread"]

    def setup(self, impl, logit_spread):
        rows, dim, vocab = size((256, 576, 49152), (8, 16, 64))
        keys = mx.random.split(mx.random.key(0), 3)
        x = mx.random.normal((rows, dim), key=keys[0])
        weight = mx.random.normal((vocab, dim), key=keys[1]) * (logit_spread / dim**0.5)
        targets = mx.random.randint(0, vocab, (rows,), key=keys[2])
        if impl == "fused":
            loss = lambda a: ops.linear_cross_entropy(a, weight, targets)  # noqa: E731
        else:
            loss = lambda a: ops.cross_entropy(ops.linear(a, weight), targets)  # noqa: E731
        grad = mx.value_and_grad(lambda a: loss(a).mean())
        self.step = lambda: mx.eval(grad(x))
        mx.eval(x, weight, targets)
        self.step()

    def time_loss_and_grad(self, *_):
        self.step()

    def track_peak_memory(self, *_):
        return bench_runner.peak_memory(self.step)

    track_peak_memory.unit = "bytes"
