"""The site-local, model-ready cache on disk: its files, manifest and settings.

Layout of a cache directory::

    cache.json          settings it was prepared with (size, fraction, normalisation,
                        lung crop), and the manifest's row count and sha256
    manifest.csv        one row per scan (pseudonymous ids, label, split, geometry)
    scans/<scan_id>.npy uint8 (selected slices, size, size), memory-mappable
    masks/<scan_id>.npy the scan's lung mask, bit-packed (common/cache/lung_mask.py)
    scan_index.jsonl    size and sha256 of every scan file as written (common/cache/scan_index.py)
    qa.json, qa.html    the quality report
    .salt               the site's pseudonym salt (never leaves the site)

Every file is written to a temporary name and renamed, so an interrupted ``prepare`` never
leaves a half-written scan or manifest behind; a write that fails (a full disk) names the
file it was writing.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from fedct.common.cache.config import RUN_CONFIG_KEYS, differing_settings

CACHE_VERSION = 1
MANIFEST_RECORD = "manifest"  # cache.json: {"rows": N, "sha256": ...} of manifest.csv
SPLITS = ("train", "tune", "test")
MANIFEST_FIELDS = (
    "scan_id",
    "patient_id",
    "label",
    "global_class",
    "class_index",
    "split",
    "n_slices_total",
    "n_slices_selected",
    "selected_start",
    "spacing_z_mm",
    "spacing_y_mm",
    "spacing_x_mm",
    "thickness_mm",
    "manufacturer",
    "format",
    "severity",
    "warnings",
)


class CacheError(RuntimeError):
    """A cache directory is missing, incomplete, or was prepared with other settings."""


@contextmanager
def naming_path(path: Path) -> Iterator[None]:
    """Re-raise an ``OSError`` of the block with ``path`` as its file name (a failed write()
    names no file: ENOSPC would say "No space left on device" and nothing else)."""
    try:
        yield
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


@contextmanager
def atomic_open(path: Path, mode: str = "w", *, durable: bool = False) -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` and rename it over ``path`` on success.

    ``durable`` also forces the content to disk before the rename, so that not even a power
    loss can leave ``path`` naming a file whose blocks were never written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with naming_path(path), open(tmp, mode, newline="" if "b" not in mode else None) as handle:
            yield handle
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def scan_path(cache_dir: Path, scan_id: str) -> Path:
    return Path(cache_dir) / "scans" / f"{scan_id}.npy"


def write_scan(cache_dir: Path, scan_id: str, pixels: np.ndarray) -> bytes:
    """Store one scan's uint8 (S, H, W) slices; returns the bytes written (for their record
    in common/cache/scan_index.py)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3:
        raise ValueError(f"cache pixels must be uint8 (S, H, W), got {pixels.dtype} {pixels.shape}")
    buffer = io.BytesIO()
    np.save(buffer, pixels)
    blob = buffer.getvalue()
    with atomic_open(scan_path(cache_dir, scan_id), "wb") as handle:
        handle.write(blob)
    return blob


def _write_cache_json(cache_dir: Path, content: dict[str, Any]) -> None:
    with atomic_open(Path(cache_dir) / "cache.json") as handle:
        json.dump(content, handle, indent=2, sort_keys=True)


def write_settings(cache_dir: Path, settings: dict[str, Any]) -> None:
    """Record the settings a cache is prepared with (keeping the manifest's record)."""
    kept = {k: v for k, v in (read_settings(cache_dir) or {}).items() if k == MANIFEST_RECORD}
    _write_cache_json(cache_dir, {**kept, "version": CACHE_VERSION, **settings})


def read_settings(cache_dir: Path) -> dict[str, Any] | None:
    """The settings a cache was prepared with, or None for a directory that is no cache yet."""
    path = Path(cache_dir) / "cache.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CacheError(f"{path}: unreadable cache settings ({exc})") from exc


def check_run_settings(cache_dir: Path, run_config: Mapping[str, Any]) -> None:
    """Refuse a cache prepared otherwise than the run's ``image-size``, ``slice-fraction``,
    ``normalize`` and ``lung-crop`` say: a model must see the same pixels at every site and at
    evaluation."""
    settings = read_settings(cache_dir)
    if settings is None:
        raise CacheError(f"{cache_dir}: no cache.json; run `fedct prepare` for this data")
    wanted = {name: run_config[key] for name, key in RUN_CONFIG_KEYS.items() if key in run_config}
    differences = [
        f"{RUN_CONFIG_KEYS[name]} = {run!r} but the cache has {cached!r}"
        for name, (cached, run) in differing_settings(settings, wanted).items()
    ]
    if differences:
        raise CacheError(
            f"{cache_dir}: prepared with other settings than the run: " + "; ".join(differences)
        )


def write_manifest(cache_dir: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write the manifest, then record its row count and sha256 in ``cache.json`` so that a
    manifest damaged or cut later is recognised as such."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=MANIFEST_FIELDS)
    writer.writeheader()
    for row in sorted(rows, key=lambda r: r["scan_id"]):
        writer.writerow({key: row.get(key, "") for key in MANIFEST_FIELDS})
    blob = text.getvalue().encode()
    with atomic_open(Path(cache_dir) / "manifest.csv", "wb") as handle:
        handle.write(blob)
    record = {"rows": len(rows), "sha256": hashlib.sha256(blob).hexdigest()}
    _write_cache_json(cache_dir, {**(read_settings(cache_dir) or {}), MANIFEST_RECORD: record})


def read_manifest(cache_dir: Path, *, verify: bool = True) -> list[dict[str, str]]:
    """The manifest's rows.  Refused with a :class:`CacheError` naming the file and the row:
    a missing file or column, bytes that are not UTF-8 CSV, a row cut short, and (``verify``,
    when ``cache.json`` records it) a manifest that is not the one ``fedct prepare`` wrote."""
    path = Path(cache_dir) / "manifest.csv"
    rerun = "; run `fedct prepare` on this site again"
    try:
        blob = path.read_bytes()
    except FileNotFoundError as exc:
        raise CacheError(f"{path}: no manifest; run `fedct prepare` on this site first") from exc
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CacheError(
            f"{path}: not a CSV manifest (byte {exc.start} is not UTF-8){rerun}"
        ) from exc
    record = (read_settings(cache_dir) or {}).get(MANIFEST_RECORD) if verify else None
    if record and hashlib.sha256(blob).hexdigest() != record.get("sha256"):
        lines = max(0, len(text.splitlines()) - 1)
        raise CacheError(
            f"{path}: damaged or cut ({lines} rows where fedct prepare wrote "
            f"{record.get('rows')}, and another sha256){rerun}"
        )
    try:
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise CacheError(f"{path}: not a CSV manifest ({exc}){rerun}") from exc
    missing = set(MANIFEST_FIELDS) - set(rows[0] if rows else MANIFEST_FIELDS)
    if missing:
        raise CacheError(f"{path}: manifest lacks columns {sorted(missing)}")
    for number, row in enumerate(rows, start=2):
        if None in row or None in row.values():
            raise CacheError(f"{path}: row {number} has the wrong number of fields (cut?){rerun}")
    return rows


def patient_content_keys(cache_dir: Path, rows: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """Pseudonymous patient id → a name that depends only on the patient's cached pixels
    (the smallest sha256 of their scans).  Two preparations of the same data — each with its
    own salt — give every patient the same key, so what is ordered by it (the bootstrap's
    patients) does not depend on the salt."""
    keys: dict[str, str] = {}
    for row in rows:
        pixels = np.load(scan_path(cache_dir, row["scan_id"]), mmap_mode="r")
        digest = hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()
        patient = row["patient_id"]
        keys[patient] = min(keys.get(patient, digest), digest)
    return keys


def content_order(cache_dir: Path) -> Callable[[Mapping[str, str]], str]:
    """A sort key for manifest rows that depends on the scans' pixels, not on the pseudonyms
    (the manifest is in pseudonym order, which follows the site's secret salt): the sha256
    the scan index recorded for the file, or the file's own.  Two preparations of the same
    data therefore train on the same batches in the same order."""
    from fedct.common.cache.scan_index import ScanIndex  # scan_index builds on this module

    records = ScanIndex(cache_dir).records

    def key(row: Mapping[str, str]) -> str:
        record = records.get(row["scan_id"])
        if record is not None:
            return record.sha256
        try:
            return hashlib.sha256(scan_path(cache_dir, row["scan_id"]).read_bytes()).hexdigest()
        except OSError:
            return row["scan_id"]  # reading the item names the file and the reason

    return key
