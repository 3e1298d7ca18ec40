"""Generate CLI options from typed dataclass configs, so `--help` is always the truth.

A config's fields become options (`min_chars` -> `--min-chars`; a nested config `train` gives
`--train.lr`), their types come from the annotations and their help text from the comment at
the end of each field's line. Commands receive the built config objects.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import typing
from typing import Annotated, Any, Callable

import typer

_FIELD_COMMENT = re.compile(r"^\s*(\w+)\s*:[^#]*#\s*(.+)$")


@functools.lru_cache(maxsize=None)
def field_comments(cls: type) -> dict[str, str]:
    """`name: type = default  # help text` -> {name: help text}."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out = {}
    for line in source.splitlines():
        m = _FIELD_COMMENT.match(line)
        if m:
            out.setdefault(m.group(1), m.group(2).strip())
    return out


def _flag(prefix: str, name: str) -> str:
    return "--" + prefix + name.replace("_", "-")


def _param_name(prefix: str, name: str) -> str:
    return (prefix + name).replace(".", "__").replace("-", "_")


def config_parameters(cls: type, prefix: str = "", panel: str | None = None) -> list[inspect.Parameter]:
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    params = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        ftype = hints[f.name]
        if dataclasses.is_dataclass(ftype):
            params += config_parameters(ftype, f"{prefix}{f.name}.", panel)
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = ...
        flag = _flag(prefix, f.name)
        decls = [f"{flag}/--no-{flag[2:]}"] if ftype is bool else [flag]
        option = typer.Option(*decls, help=comments.get(f.name, ""), rich_help_panel=panel)
        params.append(
            inspect.Parameter(
                _param_name(prefix, f.name), inspect.Parameter.KEYWORD_ONLY,
                default=default, annotation=Annotated[ftype, option],
            )
        )
    return params


def build_config(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = build_config(hints[f.name], values, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = values.pop(_param_name(prefix, f.name))
    return cls(**kwargs)


def with_config(**configs: type | tuple[type, str]) -> Callable:
    """Decorator: add each named dataclass's fields as options; call the command with built configs.

    `@with_config(config=CleanConfig)` gives flat options; `(TrainConfig, "train.")` gives
    `--train.lr`-style ones.
    """

    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        # Resolve string annotations against the command's own module, not this one.
        hints = typing.get_type_hints(fn, include_extras=True)
        sig = sig.replace(parameters=[p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()])
        specs = {name: spec if isinstance(spec, tuple) else (spec, "") for name, spec in configs.items()}
        kept = [p for p in sig.parameters.values() if p.name not in specs]
        added = []
        for name, (cls, prefix) in specs.items():
            added += config_parameters(cls, prefix, panel=f"{cls.__name__} options")

        @functools.wraps(fn)
        def wrapper(**kwargs):
            for name, (cls, prefix) in specs.items():
                kwargs[name] = build_config(cls, kwargs, prefix)
            return fn(**kwargs)

        wrapper.__signature__ = sig.replace(parameters=kept + added)
        wrapper.__annotations__ = {p.name: p.annotation for p in kept + added}
        del wrapper.__wrapped__  # typer must see the new signature, not the original
        return wrapper

    return decorate
