"""The site-local, model-ready cache: format, manifest, and the torch Dataset over it.

Layout of a cache directory::

    cache.json          settings it was prepared with (size, fraction, normalisation), and
                        the manifest's row count and sha256
    manifest.csv        one row per scan (pseudonymous ids, label, split, geometry)
    scans/<scan_id>.npy uint8 (selected slices, size, size), memory-mappable
    scan_index.jsonl    size and sha256 of every scan file as written (common/scan_index.py)
    qa.json, qa.html    the quality report
    .salt               the site's pseudonym salt (never leaves the site)

Every file is written to a temporary name and renamed, so an interrupted ``prepare`` never
leaves a half-written scan or manifest behind.
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
from typing import IO, Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from common.classes import GLOBAL_CLASSES

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
def atomic_open(path: Path, mode: str = "w", *, durable: bool = False) -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` and rename it over ``path`` on success.

    ``durable`` also forces the content to disk before the rename, so that not even a power
    loss can leave ``path`` naming a file whose blocks were never written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, newline="" if "b" not in mode else None) as handle:
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
    in common/scan_index.py)."""
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


# Cache settings and the run-config keys that must agree with them for a run to use the cache.
RUN_CONFIG_KEYS = {"size": "image-size", "fraction": "slice-fraction", "normalize": "normalize"}


def check_run_settings(cache_dir: Path, run_config: Mapping[str, Any]) -> None:
    """Refuse a cache prepared otherwise than the run's ``image-size``, ``slice-fraction`` and
    ``normalize`` say: a model must see the same pixels at every site and at evaluation."""
    settings = read_settings(cache_dir)
    if settings is None:
        raise CacheError(f"{cache_dir}: no cache.json; run `fedct prepare` for this data")
    differences = [
        f"{key} = {run_config[key]!r} but the cache has {settings.get(name)!r}"
        for name, key in RUN_CONFIG_KEYS.items()
        if key in run_config and settings.get(name) != run_config[key]
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
    from common.scan_index import ScanIndex  # scan_index builds on this module

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


class ScanItem(NamedTuple):
    pixels: torch.Tensor  # (S, 1, H, W) float32 grey values in [0, 1]
    label: int
    scan_id: str
    patient_id: str


class Batch(NamedTuple):
    x: torch.Tensor  # (B, S_max, 1, H, W)
    mask: torch.Tensor  # (B, S_max) bool, True for real slices
    y: torch.Tensor  # (B,) long
    scan_ids: list[str]
    patient_ids: list[str]


def to_model_input(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (S, H, W) cache pixels → float32 (S, 1, H, W) in [0, 1].  The model makes the
    backbone's three normalised channels (``SliceClassifier.backbone_input``)."""
    grey = torch.from_numpy(np.array(pixels, dtype=np.uint8)).float().div_(255.0)
    return grey.unsqueeze(1)


class CacheDataset(Dataset[ScanItem]):
    """The labelled scans of one cache, optionally restricted to some splits.

    ``max_slices`` > 0 makes every access return a fresh random subset of at most that many of
    a scan's slices, in order: a training-time augmentation that also bounds the compute per
    scan (the mean over a random subset is an unbiased estimate of the mean over all slices).
    Evaluation uses every slice (``max_slices`` = 0).
    """

    def __init__(
        self,
        cache_dir: Path,
        splits: Sequence[str] | None = None,
        *,
        max_slices: int = 0,
        seed: int = 0,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.max_slices = max_slices
        self._rng = np.random.default_rng(seed)
        unknown = set(splits or ()) - set(SPLITS)
        if unknown:
            raise CacheError(f"unknown split(s) {sorted(unknown)}; expected {SPLITS}")
        rows = [
            row
            for row in read_manifest(self.cache_dir)
            if int(row["class_index"]) >= 0 and (splits is None or row["split"] in splits)
        ]
        self.rows = sorted(rows, key=content_order(self.cache_dir))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> ScanItem:
        row = self.rows[index]
        path = scan_path(self.cache_dir, row["scan_id"])
        try:
            pixels = np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError) as exc:
            raise CacheError(f"{path}: unreadable cached scan ({exc})") from exc
        if 0 < self.max_slices < len(pixels):
            pixels = pixels[np.sort(self._rng.choice(len(pixels), self.max_slices, replace=False))]
        return ScanItem(
            to_model_input(pixels), int(row["class_index"]), row["scan_id"], row["patient_id"]
        )

    def labels(self) -> np.ndarray:
        return np.array([int(row["class_index"]) for row in self.rows], dtype=np.int64)

    def class_counts(self) -> list[int]:
        return np.bincount(self.labels(), minlength=len(GLOBAL_CLASSES)).tolist()


def pad_collate(items: Sequence[ScanItem]) -> Batch:
    """Stack scans of different slice counts, zero-padding to the longest, with a mask."""
    longest = max(item.pixels.shape[0] for item in items)
    _, channels, height, width = items[0].pixels.shape
    x = torch.zeros(len(items), longest, channels, height, width)
    mask = torch.zeros(len(items), longest, dtype=torch.bool)
    for i, item in enumerate(items):
        n = item.pixels.shape[0]
        x[i, :n] = item.pixels
        mask[i, :n] = True
    y = torch.tensor([item.label for item in items], dtype=torch.long)
    return Batch(x, mask, y, [item.scan_id for item in items], [item.patient_id for item in items])


def make_loader(
    dataset: Dataset[ScanItem],
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
) -> DataLoader[ScanItem]:
    """A DataLoader yielding :class:`Batch`; shuffling is seeded for reproducible rounds."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        collate_fn=pad_collate,
    )
