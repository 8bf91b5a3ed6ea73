"""Settings that travel as run-config or ConfigRecord keys: one dataclass field per key.

A dataclass that travels names its keys in a ``CONFIG_KEYS`` map (field → key); the two
functions here read those keys into field values and write them back, so that the
coordinator and every site spell and type each key in one place.  Reading is strict: a
value must already have its field's type (an int serves a float field), and a float must be
finite, because the same reader parses what a hostile coordinator sends (a string ``"false"``
would otherwise become ``True``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def fits(value: Any, kind: type) -> bool:
    """Whether ``value`` is a ``kind`` as the strict reader takes it: bools only for bool,
    ints (never bools) for int, finite ints or floats for float, str for str."""
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, int | float) and math.isfinite(value)
    return isinstance(value, kind)


def kind_text(kind: type) -> str:
    """How a reason names the type ``kind``."""
    return {bool: "true or false", int: "a whole number", float: "a finite number"}.get(
        kind, "a string"
    )


def read_keys(
    defaults: Any, keys: Mapping[str, str], config: Mapping[str, Any], what: str
) -> dict[str, Any]:
    """``{field: value}`` for every key of ``keys`` in ``config``, each of the type of the
    field's value in ``defaults``; raises ValueError naming a missing or unfit key (of the
    ``what`` settings)."""
    missing = [key for key in keys.values() if key not in config]
    if missing:
        raise ValueError(f"config lacks the {what} key(s) {', '.join(missing)}")
    values = {}
    for name, key in keys.items():
        kind = type(getattr(defaults, name))
        if not fits(config[key], kind):
            raise ValueError(f"{key} must be {kind_text(kind)}")
        values[name] = kind(config[key])
    return values


def write_keys(settings: Any, keys: Mapping[str, str]) -> dict[str, Any]:
    """``{key: value}`` of ``settings``' fields named in ``keys``."""
    return {key: getattr(settings, name) for name, key in keys.items()}
