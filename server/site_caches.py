"""The fingerprints of the site caches the coordinator can see, in every round's card.

In a simulation (``fedct simulate``, ``fedct demo``) the run config's ``site-caches`` names
each site's cache, so the coordinator records each cache's fingerprint
(common/cache/scan_index.py: its manifest and its scans' sha256, by site name) in every
round's card.  A resumed run compares them with those of the card it resumes from, and says
which cache changed since then: resuming on other data mixes two datasets in one model.  On
the deployment engine the coordinator sees no cache and records none.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedct.common.cache.scan_index import fingerprint

CARD_KEY = "site_caches"


def site_cache_paths(run_config: Mapping[str, Any]) -> dict[str, Path]:
    """Site name → cache of the run config's ``site-caches`` (a site is named by its cache's
    folder in simulation, client/site_data.py)."""
    caches = [p.strip() for p in str(run_config.get("site-caches", "")).split(",") if p.strip()]
    return {Path(p).name: Path(p) for p in caches}


def fingerprints(run_config: Mapping[str, Any]) -> dict[str, str]:
    """Site name → fingerprint of its cache, for the caches the run config names."""
    return {name: fingerprint(path) for name, path in site_cache_paths(run_config).items()}


def changed_since(card: Mapping[str, Any], now: Mapping[str, str]) -> str | None:
    """Which caches differ from those ``card`` recorded, as one line; None when none does (or
    the card recorded none)."""
    before = card.get(CARD_KEY) or {}
    changed = [
        f"{name} ({before[name]} → {now.get(name, 'not in site-caches')})"
        for name in sorted(before)
        if before[name] != now.get(name)
    ]
    if not changed:
        return None
    return (
        f"site cache(s) changed since round {card.get('round', '?')} of this run: "
        + ", ".join(changed)
        + "; the resumed rounds train and score on other data than the earlier ones"
    )
