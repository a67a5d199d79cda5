"""One typed-table parser for every config: a TOML table / env / flags → a dataclass's fields.

Each layer's settings are a dataclass (``NodeConfig``, ``DHTConfig``,
``DiLoCoConfig``, ``Recipe``, the run file's tables); :func:`typed_fields`
checks a mapping against one of them key by key and returns the values in
the fields' types, so every config gets the same rules and the same errors:
``-`` and ``_`` are the same in keys, an unknown key or a value of the wrong
type is a :class:`ConfigError` naming the source and the key, an int is
accepted where a float is wanted, and text (the environment, flags) is parsed
when ``from_text`` says so.  Range checks stay with each config.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from gossamer.node.errors import ConfigError

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@functools.cache
def field_types(kind: type) -> dict[str, Any]:
    """``kind``'s dataclass fields and their resolved types."""
    hints = get_type_hints(kind)
    return {f.name: hints[f.name] for f in dataclasses.fields(kind)}


def typed_fields(
    kind: type,
    table: Mapping[str, Any],
    source: str,
    *,
    from_text: bool = False,
    skip: Collection[str] = (),
) -> dict[str, Any]:
    """``table``'s values checked and converted to ``kind``'s field types (by field name).

    ``skip``: fields that are not keys here (nested tables the caller reads itself).
    """
    fields = field_types(kind)
    out: dict[str, Any] = {}
    for key, value in table.items():
        if not isinstance(key, str):
            raise ConfigError(f"{source}: key {key!r} is not a string")
        name = key.replace("-", "_")
        if name not in fields or name in skip:
            raise ConfigError(f"unknown config key {key!r} in {source}")
        out[name] = coerce(fields[name], value, f"config key {name!r}", from_text, source)
    return out


def coerce(
    kind: Any, value: Any, what: str, from_text: bool = False, source: str | None = None
) -> Any:
    """``value`` as a ``kind`` (bool, int, float, str, Path, list[...], X | None), or a
    ConfigError saying what ``what`` expects (and where it came from)."""
    try:
        return _coerce(kind, value, from_text)
    except (TypeError, ValueError):
        pass
    where = f" (in {source})" if source else ""
    raise ConfigError(f"{what} expects {type_name(kind)}, got {value!r}{where}")


def _coerce(kind: Any, value: Any, from_text: bool) -> Any:
    origin = get_origin(kind)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(kind) if a is not type(None)]
        if value is None and len(options) < len(get_args(kind)):
            return None
        for option in options:
            try:
                return _coerce(option, value, from_text)
            except (TypeError, ValueError):
                continue
        raise TypeError
    if kind is Any:
        return value
    if kind is Path:
        if not isinstance(value, str | Path):
            raise TypeError
        return Path(value).expanduser()
    if origin in (list, tuple):
        args = get_args(kind)
        item = args[0] if args else Any
        if from_text and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise TypeError
        items = [_coerce(item, v, False) if item is not str else _str(v) for v in value]
        return items if origin is list else tuple(items)
    if origin is dict or kind is dict:
        if not isinstance(value, Mapping):
            raise TypeError
        return dict(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
        raise TypeError
    if kind is int:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, int):
            return value
        if from_text and isinstance(value, str):
            return int(value.strip())
        raise TypeError
    if kind is float:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, int | float):
            return float(value)
        if from_text and isinstance(value, str):
            return float(value.strip())
        raise TypeError
    if kind is str:
        return _str(value)
    raise ConfigError(f"a config field of type {kind!r} is not supported")


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError
    return value


def type_name(kind: Any) -> str:
    origin = get_origin(kind)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(kind) if a is not type(None))
    if origin in (list, tuple):
        args = get_args(kind)
        return f"a list of {getattr(args[0], '__name__', args[0])}" if args else "a list"
    if origin is dict or kind is dict:
        return "a table"
    return {Path: "a path", bool: "true/false", int: "an integer", float: "a number"}.get(
        kind, "a string"
    )


__all__ = ["coerce", "field_types", "type_name", "typed_fields"]
