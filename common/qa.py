"""The quality report of a prepared cache: ``qa.json``, a readable ``qa.html``, a summary.

Nothing here names a patient or a source path: rejected inputs are listed by reason and by
a salted hash of their path (run ``fedct inspect`` on the raw folder, at the site, to see
the paths themselves).
"""

from __future__ import annotations

import json
from collections import Counter
from html import escape
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from common import html
from common.cache import SPLITS, atomic_open
from common.classes import GLOBAL_CLASSES
from common.ingest.base import REASONS, Rejection
from common.pseudonym import pseudonym


def _histogram(values: list[float], edges: list[float]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        counts[f"{low:g}-{high:g}"] = sum(low <= v < high for v in values)
    counts[f">={edges[-1]:g}"] = sum(v >= edges[-1] for v in values)
    return counts


def _scrub(detail: str, path: str) -> str:
    """Remove the rejected path's components from a detail message."""
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
) -> dict[str, Any]:
    """The QA report as a JSON-ready dict."""
    counts = {cls: {split: 0 for split in SPLITS} for cls in (*GLOBAL_CLASSES, "unlabelled")}
    for row in rows:
        counts[row["global_class"] or "unlabelled"][row["split"]] += 1
    slices = [int(r["n_slices_total"]) for r in rows]
    thickness = [float(r["thickness_mm"]) for r in rows if r["thickness_mm"] not in ("", None)]
    warnings = Counter(w for r in rows for w in str(r["warnings"]).split(";") if w)
    return {
        "settings": {**cfg.cache_settings(), "min_slices": cfg.min_slices, "seed": cfg.seed},
        "scans": len(rows),
        "patients": len({r["patient_id"] for r in rows}),
        "counts": counts,
        "formats": dict(Counter(r["format"] for r in rows)),
        "slices_total_histogram": _histogram(slices, [0, 10, 20, 30, 40, 60, 100, 200, 400]),
        "thickness_mm_histogram": _histogram(thickness, [0, 1, 2, 3, 5, 8, 10]),
        "warnings": dict(warnings),
        "rejected_by_reason": dict(Counter(r.reason for r in rejections)),
        "rejected": [
            {
                "input": pseudonym(salt, "input", r.path),
                "reason": r.reason,
                "detail": _scrub(r.detail, r.path),
            }
            for r in sorted(rejections, key=lambda r: (r.reason, r.path))
        ],
        "reasons": {k: v for k, v in REASONS.items() if any(r.reason == k for r in rejections)},
        "seconds": round(seconds, 2),
    }


def _bars_svg(histogram: dict[str, int]) -> str:
    peak = max(histogram.values(), default=0) or 1
    width, bar = 40 * len(histogram), 32
    parts = [f'<svg width="{width}" height="150" role="img">']
    for i, (name, count) in enumerate(histogram.items()):
        height = round(100 * count / peak)
        x = i * 40 + 4
        parts.append(
            f'<rect x="{x}" y="{110 - height}" width="{bar}" height="{height}" fill="#3b7dd8"/>'
            f'<text x="{x + bar / 2}" y="{105 - height}" text-anchor="middle">{count}</text>'
            f'<text x="{x + bar / 2}" y="125" text-anchor="middle">{escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def render_html(qa: dict[str, Any]) -> str:
    counts = qa["counts"]
    return html.page(
        "fedct cache QA",
        [
            html.paragraph(
                f"{qa['scans']} scans of {qa['patients']} patients; settings "
                f"{json.dumps(qa['settings'])}; prepared in {qa['seconds']} s."
            ),
            html.section(
                "Scans per class and split",
                html.table(
                    ["class", *SPLITS, "total"],
                    [[c, *counts[c].values(), sum(counts[c].values())] for c in counts],
                ),
            ),
            html.section(
                "Slices per scan (before selection)", _bars_svg(qa["slices_total_histogram"])
            ),
            html.section("Slice thickness (mm)", _bars_svg(qa["thickness_mm_histogram"])),
            html.section("Warnings", html.table(["warning", "scans"], qa["warnings"].items())),
            html.section(
                "Rejected inputs",
                html.table(
                    ["reason", "count", "meaning"],
                    [[k, v, REASONS[k]] for k, v in qa["rejected_by_reason"].items()],
                ),
                html.table(
                    ["reason", "input (salted hash)", "detail"],
                    [[r["reason"], r["input"], r["detail"]] for r in qa["rejected"]],
                ),
            ),
        ],
    )


def write_qa(cache_dir: Path, qa: dict[str, Any]) -> None:
    with atomic_open(Path(cache_dir) / "qa.json") as handle:
        json.dump(qa, handle, indent=2)
    with atomic_open(Path(cache_dir) / "qa.html") as handle:
        handle.write(render_html(qa))


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
