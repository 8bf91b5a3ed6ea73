"""Settings that travel as run-config or ConfigRecord keys: one dataclass field per key.

A dataclass that travels names its keys in a ``CONFIG_KEYS`` map (field → key); the two
functions here read those keys into field values and write them back, so that the
coordinator and every site spell and cast each key in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def read_keys(
    defaults: Any, keys: Mapping[str, str], config: Mapping[str, Any], what: str
) -> dict[str, Any]:
    """``{field: value}`` for every key of ``keys`` in ``config``, each cast to the type of
    the field's value in ``defaults``; raises ValueError naming a missing or unfit key (of
    the ``what`` settings)."""
    missing = [key for key in keys.values() if key not in config]
    if missing:
        raise ValueError(f"config lacks the {what} key(s) {', '.join(missing)}")
    values = {}
    for name, key in keys.items():
        kind = type(getattr(defaults, name))
        try:
            values[name] = kind(config[key])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{key}: {config[key]!r} is not a {kind.__name__}") from exc
    return values


def write_keys(settings: Any, keys: Mapping[str, str]) -> dict[str, Any]:
    """``{key: value}`` of ``settings``' fields named in ``keys``."""
    return {key: getattr(settings, name) for name, key in keys.items()}
