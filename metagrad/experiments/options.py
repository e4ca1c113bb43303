"""Config values shared by the experiments, parsed into ``MAML`` arguments."""

from __future__ import annotations

from ..errors import ConfigError

_VECTORIZE: dict[str, bool | str | None] = {
    "auto": None, "vmap": True, "true": True, "loop": False, "false": False, "support": "support",
}  # fmt: skip
_COMPILE: dict[str, bool | None] = {"auto": None, "true": True, "false": False}


def vectorize_option(value: str) -> bool | str | None:
    """The ``vectorize`` config value as ``MAML(vectorize=...)``: auto (None), vmap (True),
    loop (False), support (batch only the support sets)."""
    key = str(value).lower()
    if key not in _VECTORIZE:
        raise ConfigError(f"bad value {value!r} for vectorize: choose auto, vmap, loop or support")
    return _VECTORIZE[key]


def compile_option(value: str | bool) -> bool | None:
    """The ``compile`` config value as ``MAML(compile=...)``: auto (None), true, false."""
    key = str(value).lower()
    if key not in _COMPILE:
        raise ConfigError(f"bad value {value!r} for compile: choose auto, true or false")
    return _COMPILE[key]
