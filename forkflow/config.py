"""Typed configs: nested dataclasses filled from YAML, then from `key=value` overrides on the command line.

An unknown key is an error that names it and the closest valid key; values are checked against the field's
type and its declared range (a `Range` attached with typing.Annotated: `steps: Count = 100`), and a config
class may check relations between its fields in a `check(prefix)` method. Every error says where the bad
value came from, the YAML file or the command-line override, so a typo fails at start-up with the thing to
fix named, rather than hours into a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import yaml


class ConfigError(ValueError):
    """A config a run cannot use. `keys`: the dotted keys at fault, so loading can name where they were set."""

    def __init__(self, message: str, keys: tuple[str, ...] = ()):
        super().__init__(message)
        self.keys = tuple(keys)


@dataclass(frozen=True)
class Range:
    """The values a numeric field allows, `low <= value <= high` (an `open` end excluded, None unbounded),
    checked whenever a config is validated; `why` explains the bound in the error."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def check(self, value, key: str) -> None:
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above or value != value:  # NaN compares false to every bound
            why = f" ({self.why})" if self.why else ""
            raise ConfigError(f"{key} must be {self}, got {value!r}{why}", (key,))

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


# the ranges most fields need
Count = Annotated[int, Range(1)]
NonNegativeInt = Annotated[int, Range(0)]  # 0 usually means "off" or "never"
Positive = Annotated[float, Range(0, low_open=True)]
NonNegative = Annotated[float, Range(0)]
Fraction = Annotated[float, Range(0, 1)]
Probability = Annotated[float, Range(0, 1, low_open=True)]  # (0, 1]: a top-p, a kept share


def _closest(key: str, valid) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.0)
    return f"; did you mean {match[0]!r}?" if match else ""


def _fields(cls) -> dict[str, typing.Any]:
    """Field name -> annotated type (typing.Annotated kept, so its Range travels with it)."""
    return typing.get_type_hints(cls, include_extras=True)


def _strip(tp):
    """The type under an Annotated[...] and its metadata."""
    if typing.get_origin(tp) is Annotated:
        return tp.__origin__, tp.__metadata__
    return tp, ()


def _coerce(value, tp, key: str):
    """Check/convert `value` to the annotated type `tp` (dataclass, list, Optional, literal scalars)."""
    tp, _ = _strip(tp)
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
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if errors else ConfigError(f"{key}: bad value {value!r}", (key,))
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}", (key,))
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}", (key,))
        (item,) = typing.get_args(tp)[:1] or (typing.Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}", (key,))
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}", (key,))
        return from_dict(tp, value, f"{key}.")
    if tp is typing.Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}", (key,))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}", (key,))


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a (nested) mapping; unknown keys and values of the wrong type are errors.
    `prefix` is the dotted path of `cls` in the whole config ("optim.")."""
    hints = _fields(cls)
    for key in data:
        if key not in hints:
            where = f"{prefix[:-1]}: " if prefix else ""
            raise ConfigError(f"{where}unknown key {key!r}{_closest(key, hints)}", (prefix + key,))
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in data.items()})


def validate(cfg, prefix: str = "") -> None:
    """Check every value of config `cfg` against its field's Range, then each section's relations (its
    `check(prefix)` method, if any), inner sections first; raises ConfigError naming the key."""
    for name, tp in _fields(type(cfg)).items():
        key, value = prefix + name, getattr(cfg, name)
        if dataclasses.is_dataclass(value):
            validate(value, f"{key}.")
            continue
        tp, ranges = _strip(tp)
        items = [(key, value)]
        if typing.get_origin(tp) in (list, tuple) and isinstance(value, (list, tuple)):
            (item,) = typing.get_args(tp)[:1] or (typing.Any,)
            ranges += _strip(item)[1]
            items = [(f"{key}[{i}]", v) for i, v in enumerate(value)]
        for where, v in items:
            for bound in ranges:
                if isinstance(bound, Range) and v is not None:
                    bound.check(v, where)
    if hasattr(cfg, "check"):
        cfg.check(prefix)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


class _Sources:
    """Where each value of a loaded config came from: the override that set it (or a section above it) on the
    command line, else the YAML file if it has the key; defaults have no source."""

    def __init__(self, path: Path | None, data: dict):
        self.by_key = {key: str(path) for key in _dotted(data)} if path else {}

    def override(self, dotted: str, item: str) -> None:
        self.by_key = {k: v for k, v in self.by_key.items() if not k.startswith(dotted + ".")}
        self.by_key[dotted] = f"command line {item!r}"

    def of(self, key: str) -> str | None:
        parts = re.sub(r"\[\d+\]", "", key).split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in self.by_key:
                return self.by_key[".".join(parts[:end])]
        return None

    def blame(self, error: ConfigError) -> ConfigError:
        """The error with the sources of its keys in front: `configs/x.yaml: steps must be >= 1, got 0`."""
        sources = list(dict.fromkeys(s for s in map(self.of, error.keys) if s))
        return ConfigError(f"{' and '.join(sources)}: {error}" if sources else str(error), error.keys)


def _dotted(data: dict, prefix: str = "") -> dict[str, object]:
    """A nested mapping as {dotted key: value} of its leaves."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_dotted(value, f"{prefix}{key}."))
        else:
            flat[prefix + str(key)] = value
    return flat


def apply_overrides(data: dict, overrides: list[str], cls, sources: _Sources | None = None) -> dict:
    """`a.b=value` items (value parsed as YAML) set into the nested mapping `data`, keys checked against `cls`."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line {item!r}: expected key=value, e.g. optim.lr=1e-6")
        dotted, raw = item.split("=", 1)
        if sources is not None:
            sources.override(dotted, item)
        keys = dotted.split(".")
        node, tp = data, cls
        for i, key in enumerate(keys):
            names = _fields(tp) if dataclasses.is_dataclass(tp) else {}
            if key not in names:
                where = f"{'.'.join(keys[:i])}: " if i else ""
                raise ConfigError(f"{where}unknown key {key!r}{_closest(key, names)}", (dotted,))
            if i == len(keys) - 1:
                try:
                    node[key] = yaml.safe_load(raw)
                except yaml.YAMLError as e:
                    raise ConfigError(f"{dotted}: not a YAML value ({e})", (dotted,)) from None
            else:
                node[key] = dict(node.get(key) or {})
                node, tp = node[key], _strip(names[key])[0]
    return data


def load_config(cls, path: str | Path | None, overrides: list[str] = ()):
    """Read YAML `path` (or start from the defaults when None), apply overrides, build and validate `cls`.
    Errors name the file or the override that holds the bad value."""
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    sources = _Sources(path, data)
    try:
        cfg = from_dict(cls, apply_overrides(data, list(overrides), cls, sources))
        validate(cfg)
    except ConfigError as e:
        raise sources.blame(e) from None
    return cfg


def changed_keys(cls, saved: dict, cfg) -> dict[str, tuple]:
    """{dotted key: (saved value, value in `cfg`)} for every value of config `cfg` that differs from `saved`, a
    config of `cls` as save_config wrote it (a key it lacks, from an older forkflow, counts at its default)."""
    old = {**_dotted(to_dict(cls())), **_dotted(saved)}
    new = _dotted(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))  # what save_config would write, read back
    missing = object()
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
            if old.get(k, missing) != new.get(k, missing)}


def save_config(cfg, path: str | Path) -> None:
    """Write `cfg` as YAML; atomically (a temporary file renamed over `path`), so a killed run never leaves half
    a config for the next one to read."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
