"""Which hospital a ClientApp serves: its cache, its name and its device.

On the deployment engine each SuperNode is started with
``--node-config 'data-path="/srv/fedct/cache" site="hospital-a"'`` (optionally ``device``,
``pretrained-weights``, ``state-dir``, ``dp-epsilon-budget`` and ``slice-chunk``).  In
simulation the node config holds only ``partition-id``; it picks an entry of the run config's
comma-separated ``site-caches``.

Before a site trains or scores it checks its cache (:func:`check_site_cache`): not being
written by a ``fedct prepare``, prepared as the run says, and every listed scan file whole
— header, size and sha256 against the cache's scan index (docs/ingestion.md gives what that
costs).  A problem is one line naming the file, with the cache's own path written as
``data-path``: the coordinator's card shows the site's name and the file, not the site's
folders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from flwr.app import UserConfig

from fedct.common.cache.lock import writer_of
from fedct.common.cache.scan_index import verify_cache
from fedct.common.cache.store import CacheError
from fedct.common.model.weights import weights_spec


class SiteConfigError(ValueError):
    """The node cannot tell which site cache it serves."""


@dataclass(frozen=True)
class Site:
    """One hospital's local view: never sent to the coordinator except ``name``."""

    name: str
    cache_dir: Path
    device: str
    state_dir: Path
    pretrained_weights: str | None  # None, "imagenet" or an absolute path (common/model/weights.py)
    epsilon_budget: float | None = None  # the site's ε limit over all DP runs (docs/privacy.md)
    slice_chunk: int | None = None  # slices per backbone pass here, for this site's memory


def _optional_path(text: object) -> Path | None:
    text = str(text or "").strip()
    return Path(text).expanduser().resolve() if text else None


def cache_dir_of(node_config: UserConfig, run_config: UserConfig) -> Path:
    """The folder of this node's cache, unchecked (:func:`resolve_site` checks it)."""
    cache = _optional_path(node_config.get("data-path"))
    if cache is not None:
        return cache
    if "partition-id" not in node_config:
        raise SiteConfigError(
            "node config lacks data-path: start the SuperNode with "
            '--node-config \'data-path="/path/to/cache" site="name"\''
        )
    caches = [p.strip() for p in str(run_config.get("site-caches", "")).split(",") if p.strip()]
    partition = int(node_config["partition-id"])
    if partition >= len(caches):
        raise SiteConfigError(
            f"simulation node {partition} has no cache: site-caches lists {len(caches)} "
            "(one per supernode is needed)"
        )
    return Path(caches[partition]).expanduser().resolve()


def _epsilon_budget(node_config: UserConfig) -> float | None:
    value = node_config.get("dp-epsilon-budget")
    if value is None or str(value).strip() == "":
        return None
    try:
        budget = float(value)
    except ValueError:
        budget = math.nan
    if not budget > 0:
        raise SiteConfigError(f"dp-epsilon-budget must be a positive number, got {value!r}")
    return budget


def _slice_chunk(node_config: UserConfig) -> int | None:
    value = node_config.get("slice-chunk")
    if value is None or str(value).strip() == "":
        return None
    try:
        chunk = int(str(value))
    except ValueError:
        chunk = 0
    if chunk < 1:
        raise SiteConfigError(f"slice-chunk must be a whole number of at least 1, got {value!r}")
    return chunk


def _simulated(node_config: UserConfig, run_config: UserConfig) -> str:
    """The run config's ``device`` for a simulated node (``partition-id``), else ""."""
    return str(run_config.get("device") or "") if "partition-id" in node_config else ""


def declared_name(node_config: UserConfig, run_config: UserConfig) -> str:
    """The site's name as :func:`resolve_site` gives it, without checking its cache (for
    naming a site whose cache is broken)."""
    try:
        return str(node_config.get("site") or cache_dir_of(node_config, run_config).name)
    except (SiteConfigError, ValueError):
        return f"node-{node_config.get('partition-id', '?')}"


def check_site_cache(cache: Path, run_config: UserConfig) -> int:
    """Check the site's cache before it is used (see the module docstring); returns its
    number of scans, or raises :class:`SiteConfigError` in one line naming the file."""
    writer = writer_of(cache)
    if writer is not None:
        raise SiteConfigError(
            f"data-path is being written by {writer}; wait for it to end before this site "
            "trains or scores"
        )
    if not (cache / "manifest.csv").is_file():
        raise SiteConfigError("data-path: no manifest.csv; run `fedct prepare` for this site")
    try:
        return verify_cache(cache, run_config, checksum=True)
    except CacheError as exc:
        raise SiteConfigError(" ".join(str(exc).replace(str(cache), "data-path").split())) from exc


def resolve_site(node_config: UserConfig, run_config: UserConfig) -> Site:
    """The site of this node (see the module docstring), its cache checked;
    :class:`SiteConfigError` if unknown or unusable."""
    cache = cache_dir_of(node_config, run_config)
    check_site_cache(cache, run_config)
    return Site(
        name=str(node_config.get("site") or cache.name),
        cache_dir=cache,
        # The run config (the coordinator's) picks the device only for simulated nodes.
        device=str(node_config.get("device") or _simulated(node_config, run_config) or "auto"),
        state_dir=_optional_path(node_config.get("state-dir")) or cache / "fedct-state",
        pretrained_weights=weights_spec(str(node_config.get("pretrained-weights") or "")),
        epsilon_budget=_epsilon_budget(node_config),
        slice_chunk=_slice_chunk(node_config),
    )
