"""Typed configuration: YAML files → dataclasses, dotted command-line overrides, one validation pass.

Every stage declares its options as a dataclass. ``load_config`` merges, in order, the dataclass
defaults, a YAML file (or one section of an experiment file), and ``--a.b=value`` overrides, then
builds the typed object recursively and validates it once. Errors name the offending field and,
for ``Literal`` fields, the allowed values, so a typo fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")
CONFIGS = Path(__file__).resolve().parent / "configs"  # package data: ships in the wheel


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


class Validated:
    """Base of the config dataclasses: their ``validate`` runs as they are built (``__post_init__``), from YAML
    and the command line (``build`` turns its ValueError into a ``ConfigError``) or in code, so no invalid
    config exists; nested configs have validated themselves by then."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field and the fix."""


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """Return a copy of ``data`` with ``{"a.b.c": v}`` overrides set at their nested places."""
    out = _deep_copy(data)
    for dotted, value in overrides.items():
        keys = dotted.replace("-", "_").split(".")
        node = out
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"cannot set {dotted!r}: {key!r} is not a section")
            node = child
        node[keys[-1]] = value
    return out


def _deep_copy(data: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def build(cls: type[T], data: dict | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a plain mapping, checking names and types recursively."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config field {_join(where, unknown[0])!r}; "
            f"fields of {where or cls.__name__}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(hints[f.name], data[f.name], _join(where, f.name))
        elif (
            dataclasses.is_dataclass(hints[f.name])
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            kwargs[f.name] = build(hints[f.name], {}, _join(where, f.name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            hint = "" if where else f" (--{f.name}=…)"
            raise ConfigError(f"missing required config field {_join(where, f.name)!r}{hint}")
    try:
        obj = cls(**kwargs)  # a ``Validated`` config checks itself here
        validate = getattr(obj, "validate", None)
        if not isinstance(obj, Validated) and callable(validate):
            validate()
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None
    return obj


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where} must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}={value!r} fits none of {tp}")
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return build(tp, value, where)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = get_args(tp)[:1] or (Any,)
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, str))
            or (isinstance(value, float) and not value.is_integer())
        ):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where} must be an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    section: str | None = None,
) -> T:
    """Defaults ← YAML file (its ``section`` when given and present) ← dotted overrides → ``cls``."""
    data: dict = {}
    if path:
        data = read_yaml(path)
        if section is not None and section in data:
            data = data[section] or {}
    data = apply_overrides(data, {k: v for k, v in (overrides or {}).items() if v is not None})
    return build(cls, data)


def to_dict(obj: Any) -> Any:
    """The plain-data form of a config object, for writing it beside a job's output."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, allow_unicode=True)


def named_config_path(name: str, kind: str, suffix: str) -> Path:
    """``name`` as a path if it is one, else the shipped ``configs/<kind>/<name><suffix>``."""
    path = Path(name)
    if path.is_file():
        return path
    path = CONFIGS / kind / f"{name}{suffix}"
    if not path.is_file():
        choices = sorted(p.stem for p in (CONFIGS / kind).glob(f"*{suffix}"))
        raise ConfigError(f"no {kind} config {name!r}; choose a file or one of {', '.join(choices)}")
    return path
