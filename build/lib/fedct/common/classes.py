"""The global label space and the mapping of each site's own labels onto it."""

from __future__ import annotations

import tomllib
from pathlib import Path

GLOBAL_CLASSES: tuple[str, ...] = ("normal", "pneumonia_or_abnormal", "covid19")
COVID_INDEX = GLOBAL_CLASSES.index("covid19")

# Site labels seen in the public layouts and in fedct's synthetic hospitals.  Keys are
# compared case-insensitively.  CT-1..CT-4 are MosMedData severity folders (all COVID-19).
DEFAULT_LABEL_MAP: dict[str, str] = {
    "normal": "normal",
    "ct-0": "normal",
    "cp": "pneumonia_or_abnormal",
    "nca": "pneumonia_or_abnormal",
    "pneumonia": "pneumonia_or_abnormal",
    "abnormal": "pneumonia_or_abnormal",
    "ncp": "covid19",
    "covid19": "covid19",
    "covid-19": "covid19",
    "covid": "covid19",
    "ct-1": "covid19",
    "ct-2": "covid19",
    "ct-3": "covid19",
    "ct-4": "covid19",
}


class LabelMapError(ValueError):
    """A label-map file is unreadable or maps onto a class that does not exist."""


def load_label_map(path: Path | None) -> dict[str, str]:
    """The default map, updated by a TOML file of ``site_label = "global_class"`` lines."""
    mapping = dict(DEFAULT_LABEL_MAP)
    if path is None:
        return mapping
    try:
        entries = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LabelMapError(f"{path}: cannot read label map ({exc})") from exc
    for site_label, global_class in entries.items():
        if global_class not in GLOBAL_CLASSES:
            raise LabelMapError(
                f"{path}: label {site_label!r} maps to unknown class {global_class!r}; "
                f"expected one of {', '.join(GLOBAL_CLASSES)}"
            )
        mapping[site_label.lower()] = global_class
    return mapping


def to_global(site_label: str, mapping: dict[str, str]) -> str | None:
    """The global class of a site label, or None when the map does not know it."""
    return mapping.get(site_label.strip().lower())
