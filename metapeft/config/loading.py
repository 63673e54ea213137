"""How a config is read: YAML files with profiles, ``METAPEFT_*`` environment variables
and overrides, merged layer over layer and validated once; and the packaged configs."""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from metapeft.config.errors import ConfigError, config_error, describe

ENV_PREFIX = "METAPEFT_"
"""Environment variables ``METAPEFT_<SECTION>__<FIELD>`` override config fields."""

DEFAULT_CONFIG = "sinusoid_maml"
"""The packaged config that :meth:`MetaLearningConfig.default` loads."""

# Fields that name input files: relative paths resolve against the YAML file that set them.
INPUT_PATHS: tuple[tuple[str, ...], ...] = (
    ("task", "tasks_file"),
    ("lm", "model"),
    ("lm", "tasks_file"),
    ("lm", "val_tasks_file"),
    ("lm", "test_tasks_file"),
    ("lm", "base_adapters"),
)


Config = TypeVar("Config", bound=BaseModel)


def yaml_layers(path: Path, profile: str | None) -> tuple[list[Layer], str]:
    """The layers of a YAML config file (its base, then ``profile`` if given) and the
    label that names them in errors."""
    path = Path(path).expanduser()
    label = str(path) if profile is None else f"{path} (profile {profile!r})"
    data = read_yaml(path)
    profiles = data.pop("profiles", None)
    if profiles is None:
        profiles = {}
    if not isinstance(profiles, Mapping):
        raise ConfigError(
            f"{path}: 'profiles' must be a mapping of profile names to partial configs, "
            f"got {type(profiles).__name__}",
            path=path,
        )
    layers = [Layer(data, str(path), path.parent)]
    if profile is not None:
        if profile not in profiles:
            known = ", ".join(map(str, profiles)) if profiles else "none (no 'profiles:')"
            raise ConfigError(
                f"{path}: unknown profile {profile!r}; its profiles are: {known}", path=path
            )
        partial = profiles[profile]
        if partial is None:
            partial = {}
        if not isinstance(partial, Mapping):
            raise ConfigError(
                f"{path}: profiles.{profile} must be a mapping (a partial config), "
                f"got {type(partial).__name__}",
                path=path,
            )
        layers.append(Layer(partial, f"profile {profile!r}", path.parent))
    return layers, label


def build(
    cls: type[Config],
    layers: list[Layer],
    label: str,
    path: Path | None,
    overrides: Mapping[str, Any] | None,
    environ: Mapping[str, str] | None,
) -> Config:
    """The config model ``cls`` validated from ``layers``, the environment and
    ``overrides``, merged in that order."""
    layers += env_layers(os.environ if environ is None else environ, label, path)
    if overrides is not None:
        if not isinstance(overrides, Mapping):
            raise ConfigError(
                f"invalid config {label}: overrides must be a nested dict, "
                f"got {type(overrides).__name__}",
                path=path,
            )
        layers.append(Layer(drop_none(overrides), "overrides", Path.cwd()))
    merged: dict[str, Any] = {}
    origins: dict[tuple[Any, ...], str] = {}
    for layer in layers:
        merge(merged, resolve_inputs(layer.data, layer.base_dir), origins, layer.source, ())
    try:
        return cls.model_validate(merged)
    except ValidationError as e:
        problems = tuple(describe(cls, err, origins, layers[0].source) for err in e.errors())
        raise config_error(label, problems, path) from None


# ---------------------------------------------------------------- packaged configs


def configs_dir() -> Any:
    return resources.files("metapeft").joinpath("configs")


def packaged_configs() -> list[str]:
    """The names of the configs shipped in ``metapeft/configs/``, sorted.

    Example:
        >>> "sinusoid_maml" in packaged_configs()
        True
    """
    return sorted(
        entry.name[: -len(".yaml")]
        for entry in configs_dir().iterdir()
        if entry.name.endswith(".yaml") and entry.is_file()
    )


def packaged_config(name: str) -> Path:
    """The path of a packaged config, by name (``"digits_5way_1shot"``, ``.yaml`` optional).

    Raises:
        ConfigError: If there is no such config (the message lists the packaged ones).

    Example:
        >>> packaged_config("lora_sinusoid").name
        'lora_sinusoid.yaml'
    """
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    known = packaged_configs()
    if stem not in known:
        raise ConfigError(f"no packaged config {name!r}; packaged configs: {', '.join(known)}")
    resource = configs_dir().joinpath(f"{stem}.yaml")
    # A package installed as files (wheel or editable) gives a real path.
    return Path(os.fspath(resource))


# --------------------------------------------------------------------------- YAML


class Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as a float and refusing repeated keys.

    PyYAML follows YAML 1.1, whose floats need a dot (``1.0e-3``), so ``1e-3``
    would be the string ``"1e-3"``; mlx-lm adds the same resolver.
    """

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping",
                        node.start_mark,
                        f"found the key {key_node.value!r} twice",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$""",
    ),
    list("-+0123456789."),
)


class Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper, writing lists of scalars on one line (``hidden: [40, 40]``)."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(not isinstance(item, (list, dict)) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


Dumper.add_representer(list, _represent_list)


def dump_yaml(data: Any) -> str:
    """``data`` as YAML, block style, lists of scalars on one line."""
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, default_flow_style=False)


def read_yaml(path: Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file, or a ConfigError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}", path=path) from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a folder, not a file: {path}", path=path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}", path=path) from None
    try:
        data = yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = ": ".join(s for s in (e.context, e.problem) if s)
        raise ConfigError(f"{path}: invalid YAML{where}: {what}", path=path) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}", path=path) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections (task, model, training, "
            f"output, tracking, profiles), got {type(data).__name__}",
            path=path,
        )
    return data


# ------------------------------------------------------------------------ merging


class Layer:
    """One source of values: its data, its name in messages, where its paths start."""

    def __init__(self, data: Mapping[str, Any], source: str, base_dir: Path) -> None:
        self.data, self.source, self.base_dir = data, source, base_dir


def env_layers(environ: Mapping[str, str], label: str, path: Path | None) -> list[Layer]:
    """One layer per ``METAPEFT_<SECTION>__<FIELD>[__<KEY>...]`` variable, in name order.

    Variables without ``__`` after the prefix are not config fields and are skipped,
    and so are empty ones.
    """
    found: dict[tuple[str, ...], str] = {}
    layers = []
    for name in sorted(environ):
        rest = name[len(ENV_PREFIX) :] if name.startswith(ENV_PREFIX) else ""
        if "__" not in rest or environ[name] == "":
            continue
        keys = tuple(part.lower() for part in rest.split("__"))
        if not all(keys):
            raise ConfigError(
                f"invalid config {label}: environment variable {name}: expected "
                f"{ENV_PREFIX}<SECTION>__<FIELD>, "
                "names separated by exactly two underscores",
                path=path,
            )
        for other_keys, other in found.items():
            if keys[: len(other_keys)] == other_keys or other_keys[: len(keys)] == keys:
                raise ConfigError(
                    f"invalid config {label}: environment variables {other} and {name} "
                    "set the same field",
                    path=path,
                )
        found[keys] = name
        try:
            value = yaml.load(environ[name], Loader=Loader)  # noqa: S506 (safe)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError(
                f"invalid config {label}: environment variable {name}={environ[name]!r} "
                f"is not a YAML value: {problem}",
                path=path,
            ) from None
        for key in reversed(keys):
            value = {key: value}
        layers.append(Layer(value, f"environment variable {name}", Path.cwd()))
    return layers


def drop_none(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` without its ``None`` values, at every depth (CLI flags not given)."""
    return {
        k: drop_none(v) if isinstance(v, Mapping) else v for k, v in data.items() if v is not None
    }


def resolve_inputs(data: Mapping[str, Any], base_dir: Path) -> Mapping[str, Any]:
    """``data`` with its relative input paths (``INPUT_PATHS``) joined to ``base_dir``."""
    out = data
    for keys in INPUT_PATHS:
        node: Any = data
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, Mapping) else None
        value = node.get(keys[-1]) if isinstance(node, Mapping) else None
        if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
            continue
        full = Path(value).expanduser()
        if full.is_absolute():
            continue
        if out is data:
            out = copy.deepcopy(dict(data))
        target = out
        for key in keys[:-1]:
            target[key] = dict(target[key])
            target = target[key]
        target[keys[-1]] = base_dir / full
    return out


def merge(
    into: dict[str, Any],
    layer: Mapping[str, Any],
    origins: dict[tuple[Any, ...], str],
    source: str,
    prefix: tuple[Any, ...] = (),
) -> None:
    """Deep-merge ``layer`` into ``into``, noting in ``origins`` where each value came from."""
    for key, value in layer.items():
        where = (*prefix, key)
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            merge(into[key], value, origins, source, where)
            continue
        into[key] = copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)
        for old in [o for o in origins if o[: len(where)] == where]:
            del origins[old]
        origins[where] = source
