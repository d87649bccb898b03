"""Job configs: dataclass defaults, then a YAML file, then `key=value` overrides.

Every job owns one config dataclass (nested dataclasses allowed, addressed with dotted keys:
`align.learning_rate=3e-4`). Each field carries its help text beside it (`option(default, "help")`,
as TRL's configs keep theirs in field metadata), so `--help` lists every key from the dataclasses
themselves. An unknown key is an error that names the key and where it came from, so a typo never
silently falls back to a default; a key that was renamed says its new name (a class's `RENAMED`).

Numbers are read as people write them: `5e-3`, `1e5`, `-1E-4` and `.5` are numbers in YAML files and
overrides alike (PyYAML's YAML 1.1 reads them as strings), and an integral float fits an int field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from recalign.errors import UserError

T = TypeVar("T")
_NO_DEFAULT = dataclasses.MISSING


class ConfigError(UserError):
    """A config file or override that does not fit its dataclass."""


def option(default: Any = _NO_DEFAULT, help: str = "", *, factory: Any = _NO_DEFAULT) -> Any:
    """A config field with its help text: `lr: float = option(1e-4, "AdamW learning rate")`.

    `factory` builds mutable defaults (lists, nested configs), as dataclasses.field's default_factory."""
    if not help:
        raise ValueError("option() needs a help text")
    if factory is not _NO_DEFAULT:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: 1e5, 5e-3 and .5 are numbers, not strings."""


_FLOAT = re.compile(r"""^(?:[-+]?(?:\d[\d_]*)?\.\d+(?:[eE][-+]?\d+)?
                      |[-+]?\d[\d_]*(?:\.\d*)?[eE][-+]?\d+
                      |[-+]?\d[\d_]*\.\d*
                      |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X)
# Dates are never config values: "2024-01-01" stays a string (a run name, say).
_Loader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v
                                       if tag not in ("tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp")]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _construct_float(loader: yaml.SafeLoader, node: yaml.Node) -> float:
    text = loader.construct_scalar(node).replace("_", "").lower()
    return float(text.replace(".inf", "inf").replace(".nan", "nan"))


_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def parse_yaml(text: str) -> Any:
    """YAML with numbers as people write them (see the module docstring)."""
    return yaml.load(text, Loader=_Loader)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Build `cls` from its defaults, then the YAML at `path`, then `key=value` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = parse_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        values = loaded
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value")
        try:
            value = parse_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: not a value: {str(err).splitlines()[0]}") from err
        _set_dotted(values, key.strip(), value if isinstance(value, (str, list, dict)) else _Raw(raw))
    return from_dict(cls, values, source=str(path) if path else "overrides")


class _Raw(str):
    """An override's text, kept until its field's type is known: `run.name=1e5` stays the string '1e5'."""


def from_dict(cls: type[T], values: dict[str, Any], source: str = "config", prefix: str = "") -> T:
    """Recursively build dataclass `cls` from a mapping; unknown keys raise ConfigError."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {prefix or 'config'} must be a mapping, got {_short(values)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    renamed = getattr(cls, "RENAMED", {})
    for key in unknown:
        if key in renamed:
            new = renamed[key]
            hint = f"renamed to {prefix}{new}" if new.isidentifier() else new
            raise ConfigError(f"{source}: {prefix}{key}: {hint}")
    if unknown:
        where = ", ".join(prefix + str(k) for k in unknown)
        raise ConfigError(f"{source}: unknown key(s) {where} for {cls.__name__}; known: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in values.items():
        factory = fields[name].default_factory
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict) and factory is not _NO_DEFAULT:
            # A section's default may differ from its class's (PairsConfig's prompt, say): keys not given keep it.
            value = _merge(dataclasses.asdict(factory()), value)
        kwargs[name] = _coerce(hints[name], value, source, prefix + name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: {prefix.rstrip('.') or cls.__name__}: {err}") from err


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def fingerprint(cfg: Any) -> str:
    """A stable hash of a config (or any JSON-able value): stages compare it to skip unchanged work."""
    payload = json.dumps(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`base` with `update`'s keys on top, section by section."""
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = values
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _short(value: Any, limit: int = 40) -> str:
    text = repr(str(value) if isinstance(value, _Raw) else value)
    return text if len(text) <= limit else text[:limit] + "..."


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    if isinstance(value, _Raw):
        value = str(value) if hint is str else parse_yaml(value)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for arg in non_none:
            try:
                return _coerce(arg, value, source, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{source}: {key}: {_short(value)} fits none of {hint}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, source, prefix=key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key}: expected a list, got {_short(value)}")
        item_hint = args[0] if args else Any
        items = [_coerce(item_hint, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {_short(value)}")
        return dict(value)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key}: {_short(value)} is not one of {list(args)}")
        return value
    return _coerce_scalar(hint, value, source, key)


def _coerce_scalar(hint: Any, value: Any, source: str, key: str) -> Any:
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key}: expected true/false, got {_short(value)}")
    if hint is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key}: expected an integer, got {_short(value)}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(f"{source}: {key}: expected a finite number, got {_short(value)}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{source}: {key}: expected a string, got {_short(value)}")
    return value


def describe(cls: type, prefix: str = "") -> list[dict[str, str]]:
    """Every key of a config dataclass, nested sections flattened to dotted keys, in declaration order:
    [{"key", "type", "default", "help", "section"}]. The source of `--help` and the configuration reference."""
    hints = typing.get_type_hints(cls)
    rows: list[dict[str, str]] = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        default = f.default if f.default is not _NO_DEFAULT else (
            f.default_factory() if f.default_factory is not _NO_DEFAULT else _NO_DEFAULT)
        if dataclasses.is_dataclass(hint):
            rows += describe(hint, prefix + f.name + ".")
            continue
        rows.append({"key": prefix + f.name, "type": _type_name(hint), "section": prefix.rstrip(".") or "(top level)",
                     "default": "(required)" if default is _NO_DEFAULT else _default_text(default),
                     "help": f.metadata.get("help", "")})
    return rows


def help_text(cls: type, usage: str) -> str:
    """`--help` of a job: its usage line, then every key grouped by section with type, default and help."""
    lines = [usage, "", "Every key below is set in a YAML file or as key=value (dotted for sections).", ""]
    section = None
    rows = describe(cls)
    width = min(max(len(r["key"]) for r in rows), 44) if rows else 0
    for row in rows:
        if row["section"] != section:
            section = row["section"]
            lines += ["", f"[{section}]"] if lines[-1] else [f"[{section}]"]
        lines.append(f"  {row['key']:<{width}}  {row['type']} = {row['default']}")
        if row["help"]:
            lines.append(f"  {'':<{width}}    {row['help']}")
    return "\n".join(lines) + "\n"


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (list, tuple):
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin is dict:
        return "mapping"
    return getattr(hint, "__name__", str(hint))


def _default_text(value: Any) -> str:
    if isinstance(value, str):
        return repr(value) if value == "" or value != value.strip() else value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_default_text(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)
