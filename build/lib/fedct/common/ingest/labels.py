"""A site's ``labels.csv``: which label each scan has, matched by UID, path or patient.

Columns: ``label`` and at least one key column.  Keys are tried in this order, the first
that matches a scan wins: ``series_uid``, ``study_uid``, ``path`` (the scan's folder or
file relative to the input root), ``patient_id``.  A row is identified by its first non-empty
key column: the same id twice with the same label is fine, with different labels an error
that lists the ids.  A less specific key shared by rows with different labels (a patient
with a normal and a COVID-19 study) labels no scan by itself.
"""

from __future__ import annotations

import csv
from pathlib import Path

from fedct.common.ingest.base import Scan

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
        first_line: dict[tuple[str, str], int] = {}
        conflicts: list[str] = []
        ambiguous: set[tuple[str, str]] = set()
        for line, row in enumerate(rows, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            label = row.get("label")
            present = [key for key in keys if row.get(key)]
            if not (label and present):
                continue
            for key in present:
                value = row[key]
                known = by_key[key].setdefault(value, label)
                first_line.setdefault((key, value), line)
                if known == label:
                    continue
                if key == present[0]:
                    conflicts.append(
                        f"{key} {value} (line {first_line[key, value]}: {known!r}, "
                        f"line {line}: {label!r})"
                    )
                else:
                    ambiguous.add((key, value))
        if conflicts:
            shown = "; ".join(conflicts[:10]) + (
                f"; and {len(conflicts) - 10} more" if len(conflicts) > 10 else ""
            )
            raise LabelsError(f"{path}: {len(conflicts)} ids have conflicting labels: {shown}")
        for key, value in ambiguous:
            del by_key[key][value]
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
