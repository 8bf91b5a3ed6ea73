"""``fedct inspect``: what fedct sees in a raw folder, as one JSON object, for site operators.

Unlike the cache and QA report, this local diagnostic shows UIDs and source paths in clear:
it is meant for the person at the site who has to find the files.  Every file under the
folder appears once: in a scan's ``files``, in a rejection's ``files`` (all of them, paths
relative to the folder), or in ``ignored``; ``files`` counts them.  With ``--cache CACHE``
(the cache prepared from this folder) each rejection and ignored file also carries the
``qa_id`` that CACHE's qa.json and qa.html show for it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fedct.common.cache.pseudonym import SALT_FILE
from fedct.common.cache.qa import input_id
from fedct.common.cache.selection import middle_slices
from fedct.common.ingest.base import Ignored, Rejection, ScanLoadError
from fedct.common.ingest.discover import read_input
from fedct.common.ingest.voxels import brief, read_checked


def _site_salt(cache: Path) -> bytes:
    """The salt of a prepared cache (read only: inspect never creates one)."""
    path = Path(cache) / SALT_FILE
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{path}: cannot read the cache's salt ({exc}); is {cache} a cache?"
        ) from exc


def inspect_input(
    root: Path,
    *,
    fmt: str = "auto",
    fraction: float = 0.5,
    dump_hu: Path | None = None,
    cache: Path | None = None,
) -> dict[str, Any]:
    """``{"scans", "rejected", "ignored", "files"}`` for ``root``; HU volumes to ``dump_hu``;
    QA ids from the salt of ``cache``."""
    salt = _site_salt(cache) if cache is not None else None
    scans: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    ignored: list[dict[str, str]] = []

    def reject(item: Rejection) -> None:
        entry: dict[str, Any] = {
            "path": item.path,
            "reason": item.reason,
            "detail": item.detail,
            "files": list(item.files),
        }
        if salt is not None:
            entry["qa_id"] = input_id(salt, "rejection", item.reason, item.path)
        rejected.append(entry)

    for item in read_input(Path(root), fmt):
        if isinstance(item, Ignored):
            entry = {"path": item.path, "what": item.what}
            if salt is not None:
                entry["qa_id"] = input_id(salt, "ignored", item.path)
            ignored.append(entry)
            continue
        if isinstance(item, Rejection):
            reject(item)
            continue
        if dump_hu is not None:
            try:
                volume = read_checked(item, 0, item.n_slices)[0].astype(np.float32)
            except ScanLoadError as exc:
                failed = exc.rejection
                reject(Rejection(failed.path, failed.reason, failed.detail, item.files))
                continue
            except Exception as exc:  # a reader failing in a way no rule foresaw
                reject(Rejection(item.source, "reader-error", brief(exc), item.files))
                continue
            dump_hu.mkdir(parents=True, exist_ok=True)
            np.save(dump_hu / f"{Path(item.series_key).name}.npy", volume)
        scans.append(
            {
                "study_uid": item.study_key,
                "series_uid": item.series_key,
                "source": item.source,
                "format": item.format,
                "n_slices": item.n_slices,
                "spacing_mm": [round(v, 6) for v in item.spacing_mm],
                "sop_instance_uids": list(item.instance_uids),
                "selected": list(middle_slices(item.n_slices, fraction)),
                "warnings": list(item.warnings),
                "files": list(item.files),
            }
        )
    in_scans = sum(len(s["files"]) for s in scans)
    in_rejections = sum(len(r["files"]) for r in rejected)
    return {
        "scans": scans,
        "rejected": rejected,
        "ignored": ignored,
        "files": {
            "read": in_scans + in_rejections + len(ignored),
            "in_scans": in_scans,
            "rejected": in_rejections,
            "ignored": len(ignored),
        },
    }


def run(args: argparse.Namespace) -> int:
    try:
        report = inspect_input(
            args.path,
            fmt=args.format,
            fraction=args.fraction,
            dump_hu=args.dump_hu,
            cache=args.cache,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if report["scans"] else 1
