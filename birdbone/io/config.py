"""Typed configs from YAML and ``--set key=value``: read once, checked once, then plain dataclasses.

:func:`load_config` builds a (frozen) dataclass, nested dataclasses included, from an optional
YAML file and ``key=value`` overrides (dotted keys reach nested sections: ``heal.steps=20``).
Unknown keys and values of the wrong type are one-line errors naming the file (with line and
column of the offending key) or the option; the dataclass's own ``__post_init__`` checks ranges. :func:`config_dict` turns it back into
plain data for a run folder's ``config.json``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from birdbone.io.errors import BirdboneError, InputError, shown
from birdbone.io.inputs import note_input, read_yaml

T = TypeVar("T")
# a config value is a name, a path or a short description, never a document
MAX_TEXT = 4096


class ConfigError(BirdboneError):
    """A config value a user must fix; ``keys`` is where it sits (section names, then the key)."""

    def __init__(self, message: str, keys: tuple[str, ...] = ()):
        super().__init__(message)
        self.keys = keys


def _where(keys: tuple[str, ...]) -> str:
    return ".".join(keys)


def _coerce(value: Any, kind: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        errors = []
        for k in kinds:
            try:
                return _coerce(value, k, where)
            except BirdboneError as e:
                errors.append(str(e))
        raise BirdboneError(errors[0])
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise BirdboneError(f"{where}: expected a list, got {shown(value)}")
        item = args[0] if args else str
        return tuple(_coerce(v, item, where) for v in value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise BirdboneError(f"{where}: expected true or false, got {shown(value)}")
    if kind is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit())):
            raise BirdboneError(f"{where}: expected an integer, got {shown(value)}")
        return int(value)
    if kind is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
        except (TypeError, ValueError):
            raise BirdboneError(f"{where}: expected a number, got {shown(value)}") from None
        if not math.isfinite(number):
            raise BirdboneError(f"{where}: expected a finite number, got {shown(value)}")
        return number
    if kind is str:
        if isinstance(value, (dict, list)):
            raise BirdboneError(f"{where}: expected text, got {shown(value)}")
        if len(str(value)) > MAX_TEXT:
            raise BirdboneError(f"{where}: text of {len(str(value)):,} characters; a config value holds at most {MAX_TEXT:,}")
        return str(value)
    return value


def _build(cls: type[T], data: dict, keys: tuple[str, ...] = ()) -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"{_where(keys)}: expected a mapping of keys to values", keys)
    odd = next((k for k in data if not isinstance(k, str)), None)
    if odd is not None:
        raise ConfigError(f"{_where(keys) or cls.__name__}: config keys are names, not {shown(odd)}", keys)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        here = f"{_where(keys)}: " if keys else ""
        raise ConfigError(f"{here}config key {unknown[0]!r} does not exist (known: {', '.join(fields)})", (*keys, unknown[0]))
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _build(kind, value, (*keys, name))
        else:
            try:
                kwargs[name] = _coerce(value, kind, _where((*keys, name)))
            except BirdboneError as e:
                raise ConfigError(str(e), (*keys, name)) from None
    try:
        return cls(**kwargs)
    except (ValueError, TypeError, BirdboneError) as e:
        # range checks name the fields they judge: point at the first one the input set
        import re

        words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", str(e)))
        named = next((k for k in data if k in words), None)
        raise ConfigError(f"{_where(keys) or cls.__name__}: {e}", (*keys, named) if named else keys) from None


def _position(path: Path, keys: tuple[str, ...]) -> str:
    """``line:column`` of the deepest of ``keys`` found in the YAML at ``path`` (1-based), or ''."""
    import yaml

    try:
        node = yaml.compose(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError:
        return ""
    mark = None
    for key in keys:
        if not isinstance(node, yaml.MappingNode):
            break
        found = next(((k, v) for k, v in node.value if getattr(k, "value", None) == key), None)
        if found is None:
            break
        mark, node = found[0].start_mark, found[1]
    return f"{mark.line + 1}:{mark.column + 1}" if mark else ""


def _set(data: dict, dotted: str, value: str) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise BirdboneError(f"--set {dotted}: {k} is not a section")
    node[keys[-1]] = value


def load_config(cls: type[T], path: str | Path | None = None, sets: list[str] | tuple[str, ...] = ()) -> T:
    """``cls`` from the YAML at ``path`` (if any), then ``key=value`` overrides, checked."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        note_input(path)
        data = read_yaml(path, "config file") or {}
        if not isinstance(data, dict):
            raise InputError(path, "a config file must be a mapping of keys to values")
    overridden: set[str] = set()
    for item in sets:
        if "=" not in item:
            raise BirdboneError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        _set(data, key.strip(), value.strip())
        overridden.add(key.strip())
    try:
        return _build(cls, data)
    except ConfigError as e:
        if path is None or _where(e.keys) in overridden:
            raise
        at = _position(path, e.keys)
        raise ConfigError(f"{path}:{at}: {e}" if at else f"{path}: {e}", e.keys) from None


def config_from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """``cls`` from plain data (a run folder's saved config), checked as a YAML file would be."""
    try:
        return _build(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if where else str(e), e.keys) from None


def config_dict(cfg) -> dict:
    """Plain data (tuples as lists) for JSON."""
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


# -- documentation of config fields (for --help and flags) ---------------------------------------------
_FIELD_LINE = None


def field_docs(cls) -> dict[str, str]:
    """Each field's help text: the comment on the line that declares it (``name: type = default  # help``),
    so a config's one documentation is its source and flags never restate it."""
    import inspect
    import re

    global _FIELD_LINE
    _FIELD_LINE = _FIELD_LINE or re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$")
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's comment wins
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            m = _FIELD_LINE.match(line)
            if m and m.group(2) and m.group(1) in {f.name for f in dataclasses.fields(klass)}:
                docs[m.group(1)] = m.group(2).strip()
    return docs


def field_info(cls, dotted: str) -> tuple[Any, str]:
    """(default, help) of a field, dotted for nested sections (``heal.steps``)."""
    *sections, name = dotted.split(".")
    for s in sections:
        cls = typing.get_type_hints(cls)[s]
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = f.default if f.default is not dataclasses.MISSING else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    return default, field_docs(cls).get(name, "")


def config_keys(cls, prefix: str = "") -> list[str]:
    """Every settable key of a config, dotted, with its default: what --set and YAML accept."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            out += config_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            default, _ = field_info(cls, f.name)
            out.append(f"{prefix}{f.name}={_show(default)}")
    return out


def _show(v) -> str:
    if isinstance(v, tuple):
        return ",".join(map(str, v))
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
