"""A site's ``labels.csv``: which label each scan has, matched by UID, path or patient.

Columns: ``label`` and at least one key column.  Keys are tried in this order, the first
that matches a scan wins: ``series_uid``, ``study_uid``, ``path`` (the scan's folder or
file relative to the input root), ``patient_id``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from common.ingest.base import Scan

KEY_COLUMNS = ("series_uid", "study_uid", "path", "patient_id")


class LabelsError(ValueError):
    """labels.csv cannot be read or has no usable columns."""


class LabelTable:
    def __init__(self, by_key: dict[str, dict[str, str]]) -> None:
        self.by_key = by_key

    @classmethod
    def load(cls, path: Path) -> LabelTable:
        try:
            with open(path, newline="", encoding="utf-8-sig") as handle:
                reader = csv.DictReader(handle)
                columns = [c.strip() for c in reader.fieldnames or []]
                rows = list(reader)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise LabelsError(f"{path}: cannot read labels ({exc})") from exc
        keys = [c for c in KEY_COLUMNS if c in columns]
        if "label" not in columns or not keys:
            raise LabelsError(
                f"{path}: needs a 'label' column and one of {', '.join(KEY_COLUMNS)}; "
                f"found {', '.join(columns) or 'no header'}"
            )
        by_key: dict[str, dict[str, str]] = {k: {} for k in keys}
        for row in rows:
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            for key in keys:
                if row.get(key) and row.get("label"):
                    by_key[key][row[key]] = row["label"]
        return cls(by_key)

    def label_of(self, scan: Scan) -> str | None:
        values = {
            "series_uid": scan.series_key,
            "study_uid": scan.study_key,
            "path": scan.source,
            "patient_id": scan.patient_key,
        }
        for key, table in self.by_key.items():
            if values[key] in table:
                return table[values[key]]
        return None
