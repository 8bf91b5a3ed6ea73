"""The quality report of a prepared cache: ``qa.json``, a readable ``qa.html``, a summary.

Nothing in qa.json names a patient or a source path.  Every input file is accounted for: in
a scan, in a rejection, or ignored (not an input: a DICOMDIR index, the labels file).  Each
rejection and ignored file carries an id, a salted hash of its path that
``fedct inspect RAW --cache CACHE --json`` prints beside the path itself, so that a QA row
leads to its files at the site (:func:`input_id`).  qa.html adds pictures: slice thumbnails
of one scan per class with the selected slices marked, and the HU histogram per class
(common/cache/qa_figures.py); they show the site's own pixels and stay at the site.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedct.common import html_page
from fedct.common.cache.lung_mask import WARNINGS as LUNG_WARNINGS
from fedct.common.cache.lung_mask import LungMask
from fedct.common.cache.normalize import Normalization
from fedct.common.cache.pseudonym import pseudonym
from fedct.common.cache.qa_figures import (
    HU_EDGES,
    Sample,
    SampleScans,
    bars_svg,
    hu_chart,
    hu_counts,
    sample_figures,
)
from fedct.common.cache.store import SPLITS, atomic_open
from fedct.common.classes import GLOBAL_CLASSES
from fedct.common.ingest.base import REASONS, Ignored, Rejection, Scan

CLASSES = (*GLOBAL_CLASSES, "unlabelled")
SPACING_Z_EDGES = [0, 1, 2, 3, 5, 8, 10]
PIXEL_SPACING_EDGES = [0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2]
UNKNOWN = "unknown"
HU_KEY = "_hu_counts"  # a converted row's HU histogram, taken out before the manifest
LUNG_KEY = "_lung_share"  # a converted row's lungs' share of the body, taken out likewise
LUNG_SHARE_EDGES = [0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8]


def input_id(salt: bytes, kind: str, *values: str) -> str:
    """The id of a rejection (``kind`` "rejection": its reason and path) or of an ignored file
    (``kind`` "ignored": its path) in qa.json, qa.html and ``fedct inspect --cache``."""
    return pseudonym(salt, kind, *values, length=10)


def plural(count: int, word: str) -> str:
    """``1 file``, ``2 files``."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def _histogram(values: list[float], edges: list[float]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        counts[f"{low:g}–{high:g}"] = sum(low <= v < high for v in values)
    counts[f"≥{edges[-1]:g}"] = sum(v >= edges[-1] for v in values)
    return counts


def _number(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _bins(edges: list[float]) -> list[str]:
    """The names of the bins of ``edges`` in order, then the last open one and unknown."""
    inner = [f"{low:g}–{high:g} mm" for low, high in zip(edges[:-1], edges[1:], strict=True)]
    return [*inner, f"≥{edges[-1]:g} mm", UNKNOWN]


def _bin(value: float | None, edges: list[float]) -> str:
    if value is None or value != value:
        return UNKNOWN
    names = _bins(edges)
    for index, high in enumerate(edges[1:]):
        if value < high:
            return names[index]
    return names[-2]


def _by_class(
    rows: list[dict[str, Any]], key: Any, order: list[str] | None = None
) -> dict[str, dict[str, int]]:
    """{group: {class: scans}} for the group each row falls in (``key(row)``), groups in
    ``order`` (else sorted by name)."""
    table: dict[str, dict[str, int]] = {}
    for row in rows:
        group = key(row)
        cls = row["global_class"] or "unlabelled"
        table.setdefault(group, dict.fromkeys(CLASSES, 0))[cls] += 1
    rank = {name: i for i, name in enumerate(order or [])}
    return dict(sorted(table.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])))


def _scrub(detail: str, files: Sequence[str]) -> str:
    """Remove the rejected files' path components from a detail message."""
    for path in files:
        for part in Path(path).parts:
            if len(part) >= 3:
                detail = detail.replace(part, "…")
    return detail


def build_qa(
    rows: list[dict[str, Any]],
    rejections: list[Rejection],
    salt: bytes,
    cfg: Any,
    seconds: float,
    *,
    ignored: Sequence[Ignored] = (),
    files_in_scans: int = 0,
    hu: dict[str, list[int]] | None = None,
    samples: Sequence[Sample] = (),
    lung_shares: Sequence[float] = (),
) -> dict[str, Any]:
    """The QA report as a JSON-ready dict.  ``files_in_scans``: input files that went into
    the scans read this time; ``hu``: voxel counts per class in the bins of HU_EDGES;
    ``lung_shares``: the lungs' share of the body of each scan converted this time."""
    counts = {cls: {split: 0 for split in SPLITS} for cls in CLASSES}
    for row in rows:
        counts[row["global_class"] or "unlabelled"][row["split"]] += 1
    slices = [int(r["n_slices_total"]) for r in rows]
    thickness = [float(r["thickness_mm"]) for r in rows if r["thickness_mm"] not in ("", None)]
    warnings = Counter(w for r in rows for w in str(r["warnings"]).split(";") if w)
    rejected_files = sum(len(r.files) for r in rejections)
    return {
        "settings": {**cfg.cache_settings(), "min_slices": cfg.min_slices, "seed": cfg.seed},
        "scans": len(rows),
        "patients": len({r["patient_id"] for r in rows}),
        "counts": counts,
        "formats": dict(Counter(r["format"] for r in rows)),
        "files": {
            "read": files_in_scans + rejected_files + len(ignored),
            "in_scans": files_in_scans,
            "rejected": rejected_files,
            "ignored": len(ignored),
        },
        "slices_total_histogram": _histogram(slices, [0, 10, 20, 30, 40, 60, 100, 200, 400]),
        "thickness_mm_histogram": _histogram(thickness, [0, 1, 2, 3, 5, 8, 10]),
        "by_scanner": _by_class(rows, lambda r: r.get("manufacturer") or UNKNOWN),
        "by_slice_spacing": _by_class(
            rows,
            lambda r: _bin(_number(r.get("spacing_z_mm")), SPACING_Z_EDGES),
            _bins(SPACING_Z_EDGES),
        ),
        "by_pixel_spacing": _by_class(
            rows,
            lambda r: _bin(_number(r.get("spacing_x_mm")), PIXEL_SPACING_EDGES),
            _bins(PIXEL_SPACING_EDGES),
        ),
        "hu_histogram": {"edges": list(HU_EDGES), "per_class": hu or {}},
        "lung_masks": {
            "flagged": {flag: warnings.get(flag, 0) for flag in LUNG_WARNINGS},
            "share_histogram": _histogram(list(lung_shares), LUNG_SHARE_EDGES),
            "measured": len(lung_shares),
        },
        "samples": [sample.to_json() for sample in samples],
        "warnings": dict(warnings),
        "rejected_by_reason": dict(Counter(r.reason for r in rejections)),
        "rejected": [
            {
                "id": input_id(salt, "rejection", r.reason, r.path),
                "reason": r.reason,
                "detail": _scrub(r.detail, r.files),
                "files": len(r.files),
            }
            for r in sorted(rejections, key=lambda r: (r.reason, r.path))
        ],
        "ignored": [
            {"id": input_id(salt, "ignored", item.path), "what": item.what}
            for item in sorted(ignored, key=lambda item: item.path)
        ],
        "reasons": {k: v for k, v in REASONS.items() if any(r.reason == k for r in rejections)},
        "seconds": round(seconds, 2),
    }


def _class_table(groups: dict[str, dict[str, int]], corner: str) -> str:
    if not groups:
        return html_page.paragraph("No scans.")
    used = [c for c in CLASSES if any(g[c] for g in groups.values())]
    rows = [[name, *(g[c] for c in used), sum(g.values())] for name, g in groups.items()]
    return html_page.table([corner, *used, "total"], rows)


def _rejections(qa: dict[str, Any]) -> list[str]:
    if not qa["rejected"] and not qa.get("ignored"):
        return [html_page.paragraph("Nothing was rejected or ignored.")]
    parts = [
        html_page.paragraph(
            "Each row's id is a salted hash of the input's path. At the site, "
            "fedct inspect RAW --cache CACHE --json prints the same id beside the path and "
            "every file of the input."
        )
    ]
    for reason, count in qa["rejected_by_reason"].items():
        entries = [r for r in qa["rejected"] if r["reason"] == reason]
        files = sum(r["files"] for r in entries)
        parts.append(
            html_page.details(
                f"{reason} — {plural(count, 'input')}, {plural(files, 'file')}: {REASONS[reason]}",
                html_page.table(
                    ["id", "files", "detail"],
                    [[r["id"], r["files"], r["detail"]] for r in entries],
                ),
            )
        )
    ignored = qa.get("ignored") or []
    if ignored:
        parts.append(
            html_page.details(
                f"ignored — {plural(len(ignored), 'file')} that "
                f"{'is not an input' if len(ignored) == 1 else 'are not inputs'}",
                html_page.table(["id", "what"], [[i["id"], i["what"]] for i in ignored]),
            )
        )
    return parts


def _lung_masks(qa: dict[str, Any]) -> list[str]:
    """How many scans' lung masks failed a check, and the lungs' share of the body."""
    masks = qa.get("lung_masks") or {}
    flagged = masks.get("flagged") or {}
    rows = [[flag, LUNG_WARNINGS[flag], flagged.get(flag, 0)] for flag in LUNG_WARNINGS]
    parts = [
        html_page.paragraph(
            "Each scan's lungs are found from Hounsfield units (common/cache/lung_mask.py) and "
            "checked: their share of the body, and lungs on both sides of it. A scan whose mask "
            "fails a check is kept and flagged (its manifest warnings); with lung-crop its "
            "slices are not cropped. The mask can miss a whole lobe of dense consolidation "
            "(a white-out): look at the flagged scans."
        ),
        html_page.table(["flag", "meaning", "scans"], rows),
    ]
    if masks.get("measured"):
        parts.append(
            html_page.heading(
                f"Lungs' share of the body ({masks['measured']} scans prepared in this run)"
            )
        )
        parts.append(bars_svg(masks["share_histogram"]))
    return parts


def _settings_rows(qa: dict[str, Any]) -> list[list[Any]]:
    names = {
        "size": "slice size (pixels)",
        "fraction": "fraction of slices selected (middle)",
        "normalize": "normalisation",
        "lung_crop": "slices cropped to the lungs",
        "lung_only": "only the lungs shown (air elsewhere)",
        "min_slices": "minimum slices per scan",
        "seed": "split seed",
    }
    return [
        [names.get(k, k), ("yes" if v else "no") if isinstance(v, bool) else v]
        for k, v in qa["settings"].items()
    ]


def render_html(qa: dict[str, Any], samples: Sequence[Sample] = ()) -> str:
    counts = qa["counts"]
    files = qa.get("files", {})
    hu = qa.get("hu_histogram", {}).get("per_class") or {}
    overview = [
        ["scans / patients", f"{qa['scans']} / {qa['patients']}"],
        ["formats", ", ".join(f"{k}: {v}" for k, v in qa["formats"].items()) or None],
        [
            "input files",
            f"{files.get('read', 0)} read: {files.get('in_scans', 0)} in scans, "
            f"{files.get('rejected', 0)} rejected, {files.get('ignored', 0)} ignored",
        ],
        ["prepared in", f"{qa['seconds']} s"],
        *_settings_rows(qa),
    ]
    return html_page.page(
        "fedct cache QA",
        [
            html_page.facts(overview),
            html_page.section(
                "Scans per class and split",
                html_page.table(
                    ["class", *SPLITS, "total"],
                    [[c, *counts[c].values(), sum(counts[c].values())] for c in counts],
                ),
            ),
            html_page.section(
                "Slices of one scan per class",
                html_page.paragraph(
                    "Slices through the whole series, as the cache stores them: the first and "
                    "last slice, the first and last selected, and the middle one. Green frame: "
                    "in the selection (the middle slices); grey: not used. Cyan line: the "
                    "lung mask's outline (for the selected slices, the mask stored in the cache)."
                ),
                *sample_figures(samples),
            ),
            html_page.section("Lung masks", *_lung_masks(qa)),
            html_page.section(
                "Hounsfield units per class",
                hu_chart(hu)
                if hu
                else html_page.paragraph("No HU volume was decoded in this run."),
            ),
            html_page.section(
                "Scanners and spacing",
                html_page.heading("Scanner (Manufacturer)"),
                _class_table(qa.get("by_scanner", {}), "scanner"),
                html_page.heading("Slice spacing along z"),
                _class_table(qa.get("by_slice_spacing", {}), "spacing"),
                html_page.heading("Pixel spacing in the slice"),
                _class_table(qa.get("by_pixel_spacing", {}), "spacing"),
            ),
            html_page.section(
                "Slices per scan (before selection)", bars_svg(qa["slices_total_histogram"])
            ),
            html_page.section("Slice thickness (mm)", bars_svg(qa["thickness_mm_histogram"])),
            html_page.section(
                "Warnings",
                html_page.table(["warning", "scans"], qa["warnings"].items())
                if qa["warnings"]
                else html_page.paragraph("No scan has a warning."),
            ),
            html_page.section("Rejected and ignored inputs", *_rejections(qa)),
        ],
    )


class QACollector:
    """What ``prepare`` gathers for the report while it goes: ignored files, the files of
    each scan, the HU counts of each converted scan, one sample scan per class."""

    def __init__(self) -> None:
        self.ignored: list[Ignored] = []
        self.files: dict[str, int] = {}  # scan id -> input files
        self.hu: dict[str, list[int]] = {}
        self.lung_shares: list[float] = []
        self.samples = SampleScans()

    def add_scan(self, scan: Scan, row: dict[str, Any]) -> None:
        self.files[row["scan_id"]] = len(scan.files)
        self.samples.offer(scan, row)

    def add_converted(self, row: dict[str, Any]) -> dict[str, Any]:
        """``row`` without its HU counts, which are added to its class's."""
        share = row.pop(LUNG_KEY, None)
        if share is not None:
            self.lung_shares.append(share)
        counts = row.pop(HU_KEY, None)
        if counts is not None:
            cls = row["global_class"] or "unlabelled"
            total = self.hu.get(cls, [0] * len(counts))
            self.hu[cls] = [a + b for a, b in zip(total, counts, strict=True)]
        return row

    def write(
        self,
        cache_dir: Path,
        rows: list[dict[str, Any]],
        rejections: list[Rejection],
        salt: bytes,
        cfg: Any,
        seconds: float,
        norm: Normalization,
    ) -> dict[str, Any]:
        """Build and write qa.json and qa.html; returns the report."""
        kept = {row["scan_id"] for row in rows}
        rendered = self.samples.render(norm, cfg.size, kept, focus=cfg.lung_focus)
        samples = sorted(rendered, key=lambda sample: CLASSES.index(sample.global_class))
        qa = build_qa(
            rows,
            rejections,
            salt,
            cfg,
            seconds,
            ignored=self.ignored,
            files_in_scans=sum(n for scan_id, n in self.files.items() if scan_id in kept),
            hu={c: self.hu[c] for c in CLASSES if c in self.hu},
            samples=samples,
            lung_shares=self.lung_shares,
        )
        write_qa(cache_dir, qa, samples)
        return qa


def lung_share(lungs: LungMask) -> dict[str, float]:
    """``{LUNG_KEY: share}``: a converted scan's lungs' share of the body, for qa.json."""
    return {LUNG_KEY: lungs.share}


def scan_hu_counts(scan: Scan, hu: Any) -> dict[str, list[int]]:
    """``{HU_KEY: counts}`` of a converted scan's selected slices; empty for display values."""
    return {HU_KEY: hu_counts(hu)} if scan.intensity == "hu" else {}


def write_qa(cache_dir: Path, qa: dict[str, Any], samples: Sequence[Sample] = ()) -> None:
    with atomic_open(Path(cache_dir) / "qa.json") as handle:
        json.dump(qa, handle, indent=2)
    with atomic_open(Path(cache_dir) / "qa.html") as handle:
        handle.write(render_html(qa, samples))


def print_summary(cache_dir: Path, console: Console) -> None:
    """A table of scans per class and split, and the rejection reasons, from ``qa.json``."""
    qa = json.loads((Path(cache_dir) / "qa.json").read_text())
    table = Table(title=f"{cache_dir}: {qa['scans']} scans, {qa['patients']} patients")
    for column in ("class", *SPLITS, "total"):
        table.add_column(column, justify="right" if column != "class" else "left")
    for cls, per_split in qa["counts"].items():
        if sum(per_split.values()):
            table.add_row(cls, *map(str, per_split.values()), str(sum(per_split.values())))
    console.print(table)
    if qa["rejected_by_reason"]:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(qa["rejected_by_reason"].items()))
        console.print(f"rejected — {reasons}")
