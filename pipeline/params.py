"""Typed stage settings loaded from `params.yaml`.

Each stage owns one section of `params.yaml` and one frozen dataclass describing it. Loading
rejects unknown keys (a typo must not silently fall back to a default) and values of the wrong
type, naming the file, the section and the key.

    cfg = load_section(SynthConfig, "synth", "params.yaml")
    cfg = dataclasses.replace(cfg, seed=3)          # command-line overrides
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ParamsError(ValueError):
    """A params file, section or key that cannot be used as written."""


def _check_value(value: Any, tp: Any, where: str) -> Any:
    """Return `value` converted to the annotated type `tp`, or raise ParamsError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, where)
            except ParamsError as e:
                errors.append(str(e))
        raise ParamsError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ParamsError(f"{where}: expected {len(args)} items, got {len(value)} ({value!r})")
        return tuple(_check_value(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, _section_where(tp, where))
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ParamsError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported parameter type {tp!r} at {where}")


def _section_where(tp: Any, where: str) -> str:
    """Where a nested dataclass is named in messages: a class that is its own section of the file
    (class attribute `params_section`, e.g. `loader` nested into `pretrain`) is named by that section,
    "params.yaml:loader.workers", not by where it is nested ("params.yaml:pretrain.loader.workers")."""
    section = getattr(tp, "params_section", None)
    if not section:
        return where
    file, sep, _ = where.rpartition(":")
    return f"{file}:{section}" if sep else section


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str) -> T:
    """Build the frozen dataclass `cls` from `data`, rejecting unknown keys and bad types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{where}: expected a mapping of {cls.__name__} settings (key: value lines), "
                          f"got {type(data).__name__} {data!r}")
    data = dict(data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamsError(
            f"{where}: unknown key(s) {unknown}; valid keys are {sorted(fields)}. "
            "Fix the spelling or remove the key."
        )
    kwargs = {k: _check_value(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ParamsError(f"{where}: missing required key(s) {missing}")
    return cls(**kwargs)


def load_section(cls: type[T], section: str, path: str | Path | None) -> T:
    """Load `section` of the YAML file at `path` into `cls`; `path=None` gives the defaults."""
    if path is None:
        return cls()
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file {path} does not exist; pass --params with the path to params.yaml")
    with path.open() as f:
        doc = yaml.safe_load(f) or {}
    if not isinstance(doc, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    if section not in doc:
        raise ParamsError(f"{path}: no section '{section}' (sections present: {sorted(doc)})")
    return from_dict(cls, doc[section], f"{path}:{section}")


def override(cfg: T, **values: Any) -> T:
    """Return `cfg` with the command-line values that were given (not None) replaced."""
    given = {k: v for k, v in values.items() if v is not None}
    return dataclasses.replace(cfg, **given) if given else cfg


def as_dict(cfg: Any) -> dict[str, Any]:
    """A JSON/YAML-friendly dict of a config (tuples become lists)."""
    def conv(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return [conv(x) for x in v] if isinstance(v, tuple) else v
    return {k: conv(v) for k, v in dataclasses.asdict(cfg).items()}
