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
    """`name: type = default  # help text` -> {name: help text}, base classes included (a
    subclass that only changes defaults keeps its parents' help)."""
    out: dict[str, str] = {}
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            m = _FIELD_COMMENT.match(line)
            if m:
                out.setdefault(m.group(1), m.group(2).strip())
    return out


def _flag(prefix: str, name: str) -> str:
    return "--" + prefix + name.replace("_", "-")


def _param_name(prefix: str, name: str) -> str:
    return (prefix + name).replace(".", "__").replace("-", "_")


def config_parameters(cls: type, prefix: str = "", panel: str | None = None, *, alias: bool = False,
                      overrides: bool = False) -> list[inspect.Parameter]:
    """Options for `cls`'s fields. `alias` adds the unprefixed name too (`--lr` beside `--train.lr`);
    `overrides` makes every option default to None ("keep the value from elsewhere")."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    params = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        ftype = hints[f.name]
        if dataclasses.is_dataclass(ftype):
            params += config_parameters(ftype, f"{prefix}{f.name}.", panel, alias=alias, overrides=overrides)
            continue
        if overrides:
            default = None
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = ...
        names = [_flag(prefix, f.name)] + ([_flag("", f.name)] if alias and prefix else [])
        decls = [f"{n}/--no-{n[2:]}" for n in names] if ftype is bool else names
        help_text = comments.get(f.name, "")
        if overrides:
            ftype = typing.Optional[ftype]
        option = typer.Option(*decls, help=help_text, rich_help_panel=panel, show_default=not overrides)
        params.append(
            inspect.Parameter(
                _param_name(prefix, f.name), inspect.Parameter.KEYWORD_ONLY,
                default=default, annotation=Annotated[ftype, option],
            )
        )
    return params


def config_values(cls: type, values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Pop `cls`'s options out of a command's keyword arguments, as a (nested) dict."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            out[f.name] = config_values(hints[f.name], values, f"{prefix}{f.name}.")
        else:
            out[f.name] = values.pop(_param_name(prefix, f.name))
    return out


def build_config(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = config_values(cls, values, prefix)
    for f in dataclasses.fields(cls):
        if f.init and dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = hints[f.name](**kwargs[f.name])
    return cls(**kwargs)


@dataclasses.dataclass
class Spec:
    """How a config appears on the command line (see `with_config`)."""

    cls: type
    prefix: str = ""
    alias: bool = False  # also accept the unprefixed option names
    overrides: bool = False  # options default to None; the command receives a dict of the given ones


def with_config(**configs: type | Spec) -> Callable:
    """Decorator: add each named dataclass's fields as options; call the command with built configs.

    `@with_config(config=CleanConfig)` gives flat options; `Spec(TrainConfig, "train.", alias=True)`
    gives `--train.lr` and `--lr`; `Spec(ModelConfig, "model.", overrides=True)` passes a dict of
    only the options the user gave.
    """

    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        # Resolve string annotations against the command's own module, not this one.
        hints = typing.get_type_hints(fn, include_extras=True)
        sig = sig.replace(parameters=[p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()])
        specs = {name: spec if isinstance(spec, Spec) else Spec(spec) for name, spec in configs.items()}
        kept = [p for p in sig.parameters.values() if p.name not in specs]
        added = []
        for spec in specs.values():
            added += config_parameters(spec.cls, spec.prefix, panel=f"{spec.cls.__name__} options",
                                       alias=spec.alias, overrides=spec.overrides)

        @functools.wraps(fn)
        def wrapper(**kwargs):
            for name, spec in specs.items():
                if spec.overrides:
                    kwargs[name] = {k: v for k, v in config_values(spec.cls, kwargs, spec.prefix).items() if v is not None}
                else:
                    kwargs[name] = build_config(spec.cls, kwargs, spec.prefix)
            return fn(**kwargs)

        wrapper.__signature__ = sig.replace(parameters=kept + added)
        wrapper.__annotations__ = {p.name: p.annotation for p in kept + added}
        del wrapper.__wrapped__  # typer must see the new signature, not the original
        return wrapper

    return decorate


def flatten_to_params(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A YAML run config {"train": {"lr": 3e-4}} as command parameter names {"train__lr": 3e-4}."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}".replace("-", "_")
        if isinstance(value, dict):
            out.update(flatten_to_params(value, name + "__"))
        else:
            out[name] = value
    return out


def load_yaml_defaults(ctx: typer.Context, param, value: str | None) -> str | None:
    """Eager `--config FILE` callback: the file's values become the defaults; flags still win."""
    if value:
        from lmforge.errors import LmforgeError
        from lmforge.yamlio import read_yaml

        path = __import__("pathlib").Path(value)
        if not path.is_file():
            raise LmforgeError(f"--config {value}: no such file")
        tree = read_yaml(path, value) or {}
        if not isinstance(tree, dict):
            raise LmforgeError(f"{value}: expected a mapping at the top level")
        known = {p.name for p in ctx.command.params}
        flat = flatten_to_params(tree)
        unknown = sorted(set(flat) - known)
        if unknown:
            raise LmforgeError(f"{value}: unknown settings {', '.join(u.replace('__', '.') for u in unknown)}")
        ctx.default_map = {**(ctx.default_map or {}), **flat}
    return value


def given_on_command_line(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT", "DEFAULT_MAP")


def saved_run_config(run_dir, name: str) -> dict | None:
    """A resumed run's saved config (`run_dir/name`), or None when there is none."""
    from pathlib import Path

    from lmforge.errors import LmforgeError
    from lmforge.yamlio import read_yaml

    path = Path(run_dir) / name
    if not path.exists():
        return None
    saved = read_yaml(path)
    if not isinstance(saved, dict):
        raise LmforgeError(f"{path}: expected a mapping at the top level")
    return saved


LAUNCH_SETTINGS = frozenset({"strategy", "dist_timeout"})


def keep_given(ctx: typer.Context, current: Any, saved: dict | None, prefix: str) -> Any:
    """A config rebuilt from a saved run's values, except the options given on this command line
    (`prefix`: the options' parameter prefix, e.g. "train__")."""
    values = dict(saved or {})
    now = dataclasses.asdict(current)
    for name in now:
        # How a run is launched (processes, strategy) belongs to this launch, not to the run: a run
        # saved on 2 processes resumes on 1 without being told to forget its strategy.
        if given_on_command_line(ctx, f"{prefix}{name}") or name not in values or name in LAUNCH_SETTINGS:
            values[name] = now[name]
    return type(current)(**{k: v for k, v in values.items() if k in now})
