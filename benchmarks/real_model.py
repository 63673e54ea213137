"""asv: a LoRA forward+backward and a FOMAML meta-step on SmolLM2-135M's shape
(random weights), metapeft's fused path beside PyTorch (transformers + peft, when
installed) and, for the LoRA step, stock mlx-lm. Peak memory of each, measured alike
for MLX and torch, is in experiments/real_model_speed.py."""

from metapeft.bench import peers, real_model
from metapeft.bench.problems import size

SHAPE = size("smollm2-135m", "tiny")


def _skip_missing(impl):
    if impl == "torch" and "torch" not in peers.installed():
        raise NotImplementedError("torch is not installed (pip install -e '.[peers]')")


class LoRAStep:
    params = (["fused", "torch", "mlx-lm"],)
    param_names = ["impl"]
    timeout = 600

    def setup(self, impl):
        _skip_missing(impl)
        self.step = real_model.lora_step(SHAPE, impl)
        self.step()  # compile and warm up outside the timings

    def time_lora_step(self, impl):
        self.step()


class FOMAMLMetaStep:
    params = (["fused", "torch"],)
    param_names = ["impl"]
    timeout = 600

    def setup(self, impl):
        _skip_missing(impl)
        self.step = real_model.meta_step(SHAPE, impl)
        self.step()

    def time_meta_step(self, impl):
        self.step()
