"""The cache's record of every scan file as it was written: its size and sha256.

``scan_index.jsonl`` in the cache directory holds one line per written scan,
``{"scan_id": ..., "bytes": ..., "sha256": ...}``, appended and flushed as each scan is
finished, so that an interrupted ``fedct prepare`` knows which scans are whole and a rerun
resumes from them.  The last line for a scan id wins; a torn last line (a crash mid-append)
is ignored, which only means that scan is checked again.  ``prepare`` rewrites the file
compacted when it completes.

A scan file is *whole* when its size and sha256 match its line.  A scan written by an older
fedct has no line; it is whole when it is a readable ``.npy`` file of the size its header
implies (then its line is added).  Anything else — truncated, zero bytes, bit flips — is
damaged and prepared again.

Before a cache is used (a run's pre-flight, each site before it trains or scores, ``fedct
evaluate``) :func:`verify_cache` checks every listed scan's header (uint8 slices of the
cache's size) and size, and with ``checksum`` its sha256 against this index.  A cache's
:func:`fingerprint` names its content (manifest and index) in a model card, so that a
resumed run can tell that a cache changed since it began.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedct.common.cache.store import (
    CacheError,
    atomic_open,
    check_run_settings,
    naming_path,
    read_manifest,
    read_settings,
    scan_path,
)

INDEX_FILE = "scan_index.jsonl"


@dataclass(frozen=True)
class ScanRecord:
    scan_id: str
    bytes: int
    sha256: str

    @classmethod
    def of_blob(cls, scan_id: str, blob: bytes) -> ScanRecord:
        return cls(scan_id, len(blob), hashlib.sha256(blob).hexdigest())

    def line(self) -> str:
        return json.dumps({"scan_id": self.scan_id, "bytes": self.bytes, "sha256": self.sha256})


def npy_problem(path: Path, size: int | None = None) -> str | None:
    """Why ``path`` is not a whole ``.npy`` file (None when it is): unreadable, a bad
    header, a size other than its header implies, or (``size`` given) other than uint8
    slices of ``size`` × ``size``."""
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(handle)
            offset = handle.tell()
    except FileNotFoundError:
        return "missing"
    except Exception as exc:  # numpy's header parser raises many types on damaged bytes
        return f"not a .npy file ({exc})" if str(exc) else "not a .npy file"
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if file_size != expected:
        return f"{file_size} bytes where its header implies {expected}"
    if size is not None and (dtype != np.uint8 or len(shape) != 3 or shape[1:] != (size, size)):
        return f"holds {dtype} {shape}, not uint8 slices of {size} x {size}"
    return None


class ScanIndex:
    """Reads and appends ``scan_index.jsonl`` of one cache."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = Path(cache_dir)
        self.path = self.cache_dir / INDEX_FILE
        self.records: dict[str, ScanRecord] = {}
        if self.path.exists():
            for line in self.path.read_text(errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    record = ScanRecord(str(entry["scan_id"]), int(entry["bytes"]), entry["sha256"])
                except (ValueError, KeyError, TypeError):
                    continue  # a torn line: that scan is checked again
                self.records[record.scan_id] = record

    def append(self, record: ScanRecord) -> None:
        """Record a scan just written (flushed to disk before returning)."""
        self.records[record.scan_id] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with naming_path(self.path), open(self.path, "a") as handle:
            handle.write(record.line() + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def problem(self, scan_id: str, *, checksum: bool = True) -> str | None:
        """Why the scan file of ``scan_id`` is not whole, None when it is.  Without
        ``checksum`` only its size is compared (a ``stat``, for checks before a run)."""
        path = scan_path(self.cache_dir, scan_id)
        record = self.records.get(scan_id)
        if record is None:
            return npy_problem(path)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return "missing"
        if size != record.bytes:
            return f"{size} bytes where {record.bytes} were written"
        if checksum and _sha256(path) != record.sha256:
            return "sha256 differs from the one recorded when it was written"
        return None

    def adopt(self, scan_id: str) -> None:
        """Record a whole scan that has no line yet (written by an older fedct)."""
        if scan_id not in self.records:
            blob = scan_path(self.cache_dir, scan_id).read_bytes()
            self.append(ScanRecord.of_blob(scan_id, blob))

    def compact(self, scan_ids: set[str]) -> None:
        """Rewrite the index with one line per scan in ``scan_ids``."""
        self.records = {k: v for k, v in self.records.items() if k in scan_ids}
        with atomic_open(self.path) as handle:
            for record in sorted(self.records.values(), key=lambda r: r.scan_id):
                handle.write(record.line() + "\n")


def verify_cache(
    cache_dir: Path, run_config: Mapping[str, Any] | None = None, *, checksum: bool = False
) -> int:
    """Check a cache before it is used: its settings (against ``run_config``'s, when given),
    its manifest, and every scan file it lists: its header and size, and with ``checksum``
    its sha256 against the scan index.  Returns the number of scans; raises
    :class:`CacheError` naming the first damaged file (and how many more there are)."""
    cache_dir = Path(cache_dir)
    if run_config is not None:
        check_run_settings(cache_dir, run_config)
    rows = read_manifest(cache_dir)
    index = ScanIndex(cache_dir)
    size = (read_settings(cache_dir) or {}).get("size")
    damaged = [
        (row["scan_id"], problem)
        for row in rows
        if (problem := _scan_problem(index, row["scan_id"], size, checksum)) is not None
    ]
    if damaged:
        scan_id, problem = damaged[0]
        more = f" (and {len(damaged) - 1} more scans)" if len(damaged) > 1 else ""
        raise CacheError(
            f"{scan_path(cache_dir, scan_id)}: damaged cached scan: {problem}{more}; "
            "run `fedct prepare` on this site again to prepare it anew"
        )
    return len(rows)


def _scan_problem(index: ScanIndex, scan_id: str, size: Any, checksum: bool) -> str | None:
    recorded = index.problem(scan_id, checksum=checksum)
    return recorded or npy_problem(
        scan_path(index.cache_dir, scan_id), size if isinstance(size, int) else None
    )


def fingerprint(cache_dir: Path) -> str:
    """A short name of a cache's content: the sha256 of its manifest and of its scan index's
    records (which name every scan file's sha256), so that it changes when any scan, label or
    split does.  Computed from small files only: :func:`verify_cache` with ``checksum`` ties
    the scan files to the index."""
    cache_dir = Path(cache_dir)
    digest = hashlib.sha256()
    try:
        digest.update((cache_dir / "manifest.csv").read_bytes())
    except OSError:
        digest.update(b"no manifest")
    for record in sorted(ScanIndex(cache_dir).records.values(), key=lambda r: r.scan_id):
        digest.update(record.line().encode() + b"\n")
    return digest.hexdigest()[:16]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
