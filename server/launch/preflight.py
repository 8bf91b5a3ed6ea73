"""Checks before a simulation starts Flower: everything that would otherwise fail later, in
a ServerApp or at every simulated site, with a traceback each and 40 s of start-up first.

Every key must be a run-config key of the app (a misspelt one is named, with the key meant);
the settings must be valid (types and values, as the ServerApp checks them, external caches
included); every site cache must be prepared like the run and whole — every scan file's
header, size and sha256 against the cache's scan index, so a damaged file is named here, not
found by every round failing at its site; a resumed run needs a readable checkpoint and no
other coordinator; a new run needs a run directory that holds no run.  Each problem is one
line naming the file or key.  A resumed run whose site caches changed since its last round
gets a warning naming them (server/site_caches.py).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from fedct.common.cache.scan_index import verify_cache
from fedct.common.cache.store import CacheError
from fedct.common.run.directory import CheckpointError, RunDirectory
from fedct.server.run_lock import RunLock
from fedct.server.settings import ServerSettings, SettingsError, app_defaults
from fedct.server.site_caches import changed_since, fingerprints


class PreflightError(ValueError):
    """The run cannot start; the message says why, in one line."""


def unknown_key(key: str, where: str) -> str | None:
    """The message for a key the app does not know (None for a known one)."""
    keys = app_defaults()
    if key in keys:
        return None
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else " (docs/federated.md lists them)"
    return f"{where}: unknown run-config key {key!r}{hint}"


def check_before_launch(overrides: dict[str, Any]) -> list[str]:
    """Raise :class:`PreflightError` for the first problem of the run ``overrides`` (run-config
    keys, paths absolute, as ``fedct simulate`` passes them to ``flwr run``); returns the
    warnings to show before the run starts."""
    for key in overrides:
        if problem := unknown_key(key, "run config"):
            raise PreflightError(problem)
    run_config = {**app_defaults(), **overrides}
    try:
        settings = ServerSettings.from_run_config(run_config)
    except SettingsError as exc:
        raise PreflightError(str(exc)) from None
    for cache in str(run_config["site-caches"]).split(","):
        try:
            verify_cache(Path(cache), run_config, checksum=True)
        except CacheError as exc:
            raise PreflightError(f"site-caches: {exc}") from None
    run_dir = RunDirectory(settings.run_dir)
    try:
        if settings.resume_from is None:
            run_dir.claim()
        else:
            run_dir.load_latest()
    except CheckpointError as exc:
        key = "resume-from" if settings.resume_from else "run-dir"
        raise PreflightError(f"{key}: {exc}") from None
    if busy := RunLock(settings.run_dir, "").in_use():
        raise PreflightError(busy)
    if settings.resume_from is None:
        return []
    changed = changed_since(run_dir.latest_card(), fingerprints(run_config))
    return [f"resume-from: {changed}"] if changed else []
