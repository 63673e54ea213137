"""metapeft.shared: the toolkit's utilities when importable (a stub here), else metapeft's."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest

from metapeft import shared
from metapeft.config import ConfigError, packaged_config

STUB = {
    "utils/__init__.py": "",
    "utils/logging_utils.py": """
        import logging

        def setup_logging(log_level="INFO", log_file=None, **kwargs):
            logger = logging.getLogger("toolkit-stub")
            logger.setLevel(log_level)
            return logger
    """,
    "utils/config_manager.py": """
        class ConfigManager:
            def __init__(self, config_path, environment_prefix="EFFICIENTAI", profile="default"):
                self.config_path = config_path
    """,
    "utils/benchmark_runner.py": """
        class BenchmarkRunner:
            pass
    """,
}


@pytest.fixture
def no_utils():
    """No ``utils`` package imported before the test, nor left imported after it."""

    def forget():
        for name in [n for n in sys.modules if n == "utils" or n.startswith("utils.")]:
            del sys.modules[name]

    forget()
    yield
    forget()


@pytest.fixture
def toolkit(tmp_path, monkeypatch, no_utils):
    for path, text in STUB.items():
        file = tmp_path / path
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_the_toolkit_is_used_when_importable(toolkit):
    import utils.benchmark_runner
    import utils.config_manager

    for name in ("setup_logging", "ConfigManager", "BenchmarkRunner"):
        assert shared.source(name) == "toolkit"
    assert shared.setup_logging(log_level="DEBUG").name == "toolkit-stub"
    assert shared.ConfigManager is utils.config_manager.ConfigManager
    assert shared.BenchmarkRunner is utils.benchmark_runner.BenchmarkRunner


def test_metapeft_own_without_the_toolkit(no_utils):
    for name in ("setup_logging", "ConfigManager", "BenchmarkRunner"):
        assert shared.source(name) == "metapeft"
    assert shared.setup_logging is shared.setup_metapeft_logging
    assert shared.ConfigManager is shared.MetaConfigManager
    from metapeft.bench import BenchmarkRunner

    assert shared.BenchmarkRunner is BenchmarkRunner


def test_a_broken_toolkit_raises(toolkit):
    (toolkit / "utils" / "config_manager.py").write_text("import tomli_w_missing_here\n")
    with pytest.raises(ModuleNotFoundError, match="tomli_w_missing_here"):
        shared.source("ConfigManager")


def test_importing_shared_looks_for_no_toolkit():
    code = "import sys, metapeft.shared; print('utils' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_own_logging_replaces_its_handlers(tmp_path):
    log = tmp_path / "logs" / "run.log"
    logger = shared.setup_metapeft_logging("INFO", log)
    logger = shared.setup_metapeft_logging("INFO", log)
    try:
        ours = [h for h in logger.handlers if getattr(h, "_metapeft_shared", False)]
        assert len(ours) == 2
        logger.info("hello")
        assert "hello" in log.read_text()
        assert logger.level == logging.INFO
        with pytest.raises(ValueError, match="unknown log level"):
            shared.setup_metapeft_logging("LOUD")
    finally:
        for handler in [h for h in logger.handlers if getattr(h, "_metapeft_shared", False)]:
            logger.removeHandler(handler)
            handler.close()


def test_own_config_manager_validates(tmp_path):
    manager = shared.MetaConfigManager(packaged_config("sinusoid_maml"), "dev")
    assert manager.get("training.num_iterations") == 200
    assert manager.get("training.nope", "x") == "x"
    with pytest.raises(ConfigError, match="unknown profile"):
        shared.MetaConfigManager(packaged_config("sinusoid_maml"), "nope")


def test_unknown_names():
    with pytest.raises(KeyError, match="no shared utility"):
        shared.resolve("Plotter")
    with pytest.raises(AttributeError):
        shared.Plotter  # noqa: B018
