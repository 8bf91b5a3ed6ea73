"""``fedct inspect``: what fedct sees in a raw folder, as one JSON object, for site operators.

Unlike the cache and QA report, this local diagnostic shows UIDs and source paths in clear:
it is meant for the person at the site who has to find the files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from common.ingest.base import Rejection, ScanLoadError
from common.ingest.discover import FORMATS, read_input
from common.selection import middle_slices


def inspect_input(
    root: Path, *, fmt: str = "auto", fraction: float = 0.5, dump_hu: Path | None = None
) -> dict[str, Any]:
    """``{"scans": [...], "rejected": [...]}`` for ``root``; HU volumes to ``dump_hu``."""
    scans: list[dict[str, Any]] = []
    rejected: list[dict[str, str]] = []
    for item in read_input(Path(root), fmt):
        if isinstance(item, Rejection):
            rejected.append({"path": item.path, "reason": item.reason, "detail": item.detail})
            continue
        if dump_hu is not None:
            try:
                volume = item.load(0, item.n_slices).astype(np.float32)
            except ScanLoadError as exc:
                rejection = exc.rejection
                rejected.append(
                    {"path": rejection.path, "reason": rejection.reason, "detail": rejection.detail}
                )
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
            }
        )
    return {"scans": scans, "rejected": rejected}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="raw folder (DICOM, NIfTI or slice images)")
    parser.add_argument("--json", action="store_true", help="print JSON (the only output form)")
    parser.add_argument("--format", choices=FORMATS, default="auto")
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument(
        "--dump-hu",
        type=Path,
        help="write <series_uid>.npy HU volumes here (default: none written)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        report = inspect_input(
            args.path, fmt=args.format, fraction=args.fraction, dump_hu=args.dump_hu
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if report["scans"] else 1
