"""Dataclass configs with strict TOML/YAML override files and `--set key=value` overrides.

Every config in jowa is a (nested) dataclass that lives beside the code that reads it. Presets are
Python functions returning one. Users change them with an override file (`--config run.toml`) and
dotted CLI overrides (`--set train.lr=5e-5`). The merge is strict: an unknown key fails with the
closest valid name, and values are type-checked against the field types.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

from jowa_common.errors import ConfigError

T = TypeVar("T")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Nested dict of a dataclass config (tuples become lists: JSON/TOML friendly)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return conv(cfg)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert `value` to the annotated type `tp` (int->float allowed, lists->tuples)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: value {value!r} matches none of {tp}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} ({value!r})")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(v, args[0], where) for v in value]
        elif origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            items = [_coerce(v, a, where) for v, a in zip(value, args)]
        else:
            items = [_coerce(v, args[0], where) if args else v for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table/dict, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table for {tp.__name__}, got {value!r}")
        return apply_overrides(tp(), value, prefix=where)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {args}, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} ({value!r})")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} ({value!r})")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} ({value!r})")
        return value
    if tp is Path:
        return Path(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} ({value!r})")
    return value


def apply_overrides(cfg: T, overrides: Mapping[str, Any], prefix: str = "") -> T:
    """Return a copy of dataclass `cfg` with `overrides` (a nested mapping) applied, strictly."""
    if not dataclasses.is_dataclass(cfg):
        raise TypeError("apply_overrides needs a dataclass instance")
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        where = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            close = difflib.get_close_matches(key, fields.keys(), n=1)
            hint = f" (did you mean '{(prefix + '.' if prefix else '') + close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{where}'{hint}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            changes[key] = apply_overrides(current, value, prefix=where)
        else:
            changes[key] = _coerce(value, hints[key], where)
    return dataclasses.replace(cfg, **changes)


def load_override_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (.toml) or YAML (.yaml/.yml) override file into a nested dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            data = tomllib.loads(text)
    except Exception as e:
        raise ConfigError(f"{path}: cannot parse config: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a table/mapping")
    return data


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # bare strings need no quotes on the command line


def parse_set_args(items: Sequence[str]) -> dict[str, Any]:
    """['a.b=1', 'c=[1,2]', 'name=foo'] -> {'a': {'b': 1}, 'c': [1, 2], 'name': 'foo'}."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = _parse_value(text.strip())
    return out


def resolve_config(base: T, config_file: str | Path | None = None, sets: Sequence[str] = ()) -> T:
    """Preset -> override file -> `--set` overrides, in that order."""
    cfg = base
    if config_file is not None:
        cfg = apply_overrides(cfg, load_override_file(config_file))
    if sets:
        cfg = apply_overrides(cfg, parse_set_args(sets))
    return cfg


def config_from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build a dataclass config from a (possibly partial) dict, e.g. one saved in a checkpoint."""
    return apply_overrides(cls(), data)
