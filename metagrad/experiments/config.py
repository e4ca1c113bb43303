"""Presets and configs: flat, typed key/value tables, stored as TOML in each run.

A preset is a dict of defaults; its value types are the schema. ``--set key=value``
parses ``value`` by the type of the default, so a typo in a key or a value that does
not fit is a :class:`~metagrad.errors.ConfigError` naming the fix.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import tomli_w

from ..errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Config = dict[str, Any]


def _table() -> dict[str, tuple[str, Config]]:
    from .registry import PRESETS  # the experiments import this module: look up lazily

    return PRESETS


def presets() -> dict[str, str]:
    """Preset names and their one-line descriptions."""
    return {name: desc for name, (desc, _) in sorted(_table().items())}


def preset(name: str) -> Config:
    table = _table()
    if name not in table:
        known = ", ".join(sorted(table))
        raise ConfigError(f"unknown preset {name!r}; choose one of: {known}")
    return dict(table[name][1])


def _parse(key: str, text: str, default: Any) -> Any:
    bad = ConfigError(
        f"bad value {text!r} for {key}: expected {type(default).__name__} like {default!r}"
    )
    if isinstance(default, bool):
        low = text.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise bad
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            try:
                f = float(text)
            except ValueError:
                raise bad from None
            if f.is_integer():
                return int(f)
            raise bad from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise bad from None
    if isinstance(default, list):
        items = [s for s in text.replace("[", "").replace("]", "").split(",") if s.strip()]
        proto = default[0] if default else ""
        return [_parse(key, s.strip(), proto) for s in items]
    return text


def check_value(cfg: Mapping[str, Any], key: str, value: Any) -> Any:
    """Validate ``value`` for ``key`` against the type of the config's current value."""
    if key not in cfg:
        known = ", ".join(sorted(cfg))
        raise ConfigError(f"unknown config key {key!r}; valid keys: {known}")
    default = cfg[key]
    if isinstance(value, bool) and isinstance(default, str):
        value = str(value).lower()  # a setting that was a flag, now auto / true / false
    if isinstance(value, str) and not isinstance(default, str):
        return _parse(key, value, default)
    ok = (
        isinstance(value, type(default))
        or (isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool))
        or (isinstance(default, list) and isinstance(value, list))
    )
    if not ok or (isinstance(value, bool) and not isinstance(default, bool)):
        raise ConfigError(
            f"bad value {value!r} for {key}: expected {type(default).__name__} like {default!r}"
        )
    return float(value) if isinstance(default, float) else value


def apply_overrides(cfg: Config, assignments: Iterable[str]) -> Config:
    """Apply ``key=value`` strings to a copy of ``cfg``."""
    out = dict(cfg)
    for item in assignments:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = check_value(out, key.strip(), value)
    return out


def apply_mapping(cfg: Config, values: Mapping[str, Any], source: str) -> Config:
    out = dict(cfg)
    for key, value in values.items():
        try:
            out[key] = check_value(out, key, value)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    return out


def load_toml(path: str | Path) -> Config:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        return tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None


def dump_toml(cfg: Mapping[str, Any]) -> str:
    return tomli_w.dumps(dict(cfg))
