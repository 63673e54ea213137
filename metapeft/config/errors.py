"""How an invalid config is reported: :class:`ConfigError`, one line per problem
naming the field, its value, the layer it came from and why."""

from __future__ import annotations

import difflib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """An invalid config: a bad value, an unknown key, a missing or malformed file.

    The message is meant for a person: it names the file (and profile), then each
    problem on its own line as ``field.path = value (from source): why``.

    Attributes:
        path: The config file, when there is one.
        problems: One line per problem (the lines of the message after its header).
    """

    def __init__(
        self, message: str, *, path: Path | None = None, problems: tuple[str, ...] = ()
    ) -> None:
        super().__init__(message)
        self.path = path
        self.problems = problems or (message,)


NO_VALUE = object()


def field_error(field: str, reason: str, value: Any = NO_VALUE) -> PydanticCustomError:
    """A validation error on ``field`` (a dotted path), raised by a cross-field check."""
    ctx = {"reason": reason, "field": field}
    if value is not NO_VALUE:
        ctx["value"] = value
    return PydanticCustomError("metapeft_config", "{reason}", ctx)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside a field's annotation (``LoRASection | None`` -> LoRASection)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The section model at ``loc`` of the config model ``root`` (``()``: ``root``), if any."""
    model: type[BaseModel] | None = root
    for key in loc:
        info = model.model_fields.get(key) if isinstance(key, str) else None
        model = _model_in(info.annotation) if info is not None else None
        if model is None:
            return None
    return model


def _unknown_key(root: type[BaseModel], loc: tuple[Any, ...]) -> str:
    model = _model_at(root, loc[:-1])
    if model is None:
        return "unknown key"
    known = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    where = f"fields of {_dotted(loc[:-1])}" if loc[:-1] else "sections"
    return f"unknown key{hint} ({where}: {', '.join(known)})"


def _dotted(loc: tuple[Any, ...]) -> str:
    """``("model", "hidden", 1)`` -> ``"model.hidden[1]"``."""
    text = ""
    for key in loc:
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else str(key))
    return text


def _show(value: Any) -> str:
    text = repr(str(value) if isinstance(value, Path) else value)
    return text if len(text) <= 80 else text[:77] + "..."


def describe(
    root: type[BaseModel],
    err: Mapping[str, Any],
    origins: dict[tuple[Any, ...], str],
    main: str,
) -> str:
    """One pydantic error of the config model ``root`` as ``field = value (from source): why``."""
    ctx = err.get("ctx") or {}
    if err["type"] == "metapeft_config":
        loc: tuple[Any, ...] = tuple(ctx["field"].split("."))
        value, reason = ctx.get("value", NO_VALUE), ctx["reason"]
    else:
        loc, value, reason = tuple(err["loc"]), err.get("input", NO_VALUE), err["msg"]
        if err["type"] == "value_error" and "error" in ctx:
            reason = str(ctx["error"])
        elif err["type"] == "extra_forbidden":
            reason = _unknown_key(root, loc)
    text = _dotted(loc) or "(top level)"
    if value is not NO_VALUE and err["type"] != "missing":
        text += f" = {_show(value)}"
    sources = _sources(loc, origins)
    if not sources:
        text += " (default)"
    elif sources != [main]:
        text += f" (from {' and '.join(s for s in sources if s != main)})"
    return f"{text}: {reason}"


def _sources(loc: tuple[Any, ...], origins: dict[tuple[Any, ...], str]) -> list[str]:
    """The layers that set the value at ``loc``: the one that set it or its parent, then
    those that merged parts into it (a mapping merged from several layers)."""
    found = [origins[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in origins][:1]
    found += [s for o, s in origins.items() if len(o) > len(loc) and o[: len(loc)] == loc]
    return list(dict.fromkeys(found))


def config_error(label: str, problems: tuple[str, ...], path: Path | None) -> ConfigError:
    head = f"invalid config {label}"
    if len(problems) == 1:
        return ConfigError(f"{head}: {problems[0]}", path=path, problems=problems)
    shown = [f"  {p}" for p in problems[:10]]
    if len(problems) > 10:
        shown.append(f"  ... and {len(problems) - 10} more")
    message = f"{head}: {len(problems)} problems\n" + "\n".join(shown)
    return ConfigError(message, path=path, problems=problems)
