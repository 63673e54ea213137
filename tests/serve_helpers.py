"""A tiny model with adapters on disk, and ``metapeft serve`` as a real process on a
free loopback port, for the tests of :mod:`metapeft.serve`."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlx.core as mx
from mlx.utils import tree_map

# A template in the style of the chat models', within the tiny tokenizer's characters.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def save_model(
    folder: Path,
    model_type: str = "llama",
    hidden_size: int = 64,
    quantize_bits: int | None = None,
) -> Path:
    """A random two-block model in mlx-lm's layout, with a chat template."""
    from metapeft.lm.random_model import save_random_model

    save_random_model(
        folder, model_type, hidden_size=hidden_size, num_layers=2, quantize_bits=quantize_bits
    )
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_file.write_text(json.dumps(config))
    return folder


def save_adapter(model_dir: Path, folder: Path, spec, seed: int) -> Path:
    """Random (non-zero) adapters of ``spec`` for the model, saved in mlx-lm's layout."""
    import mlx_lm

    from metapeft.lm import add_lora, save_adapters

    model, _ = mlx_lm.load(str(model_dir))
    add_lora(model, spec, fast=False)
    mx.random.seed(seed)
    weights = tree_map(lambda p: 0.3 * mx.random.normal(p.shape), model.trainable_parameters())
    return save_adapters(folder, weights, spec, {"model": str(model_dir)})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``metapeft serve`` on 127.0.0.1, its output in a log file.

    Example:
        >>> with ServerProcess(["--model", str(model_dir)], tmp_path / "log") as server:
        ...     httpx.get(f"{server.url}/health")
    """

    def __init__(self, args: list[str], log: Path, startup_timeout: float = 120.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log_file = open(log, "w")  # noqa: SIM115 (closed in stop)
        command = [sys.executable, "-m", "metapeft", "serve", *args, "--port", str(self.port)]
        self.proc = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"the server exited at startup:\n{log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"the server did not start in {startup_timeout} s:\n{log.read_text()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log_file.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def metric_samples(url: str, headers: dict[str, str] | None = None) -> dict[tuple, float]:
    """``/metrics`` parsed by prometheus-client: ``{(sample name, labels...): value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, *sorted(s.labels.items()))] = s.value
    return samples


def metric(samples: dict[tuple, float], name: str, **labels: str) -> float:
    """One sample's value, 0 when absent (a labelled series appears on first use)."""
    return samples.get((name, *sorted(labels.items())), 0.0)
