"""The pictures of the cache QA report (common/cache/qa.py): bar charts, a HU histogram per class,
and slice thumbnails of one scan per class with the selected slices marked.

The thumbnails show what the model is given: slices through the whole series (its first and
last slice, the first and last selected, the middle), normalised and resized exactly as the
cache stores them, so windowing, orientation and the middle-slice selection can be checked
by eye.  They are pixels of the site's own scans and stay in qa.html, at the site, like the
cache itself; qa.json records only which slices were shown.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

import numpy as np

from fedct.common import html_page
from fedct.common.cache.config import LungFocus
from fedct.common.cache.lung_mask import (
    crop,
    model_view,
    outlined,
    resize_mask,
    segment_lungs,
)
from fedct.common.cache.normalize import Normalization, to_cache_pixels
from fedct.common.ingest.base import Scan, ScanLoadError

HU_EDGES = tuple(range(-1100, 1601, 100))  # 100-HU bins; values outside go to the end bins
THUMBNAIL_PX = 128
_SELECTED, _OUTSIDE = "#2ca02c", "#bbbbbb"


def hu_counts(hu: np.ndarray) -> list[int]:
    """Voxel counts of ``hu`` in the bins of :data:`HU_EDGES` (outliers in the end bins)."""
    clipped = np.clip(hu, HU_EDGES[0], HU_EDGES[-1] - 1e-3)
    return np.histogram(clipped, bins=HU_EDGES)[0].astype(int).tolist()


def bars_svg(counts: dict[str, int], *, unit: str = "scans", width: int = 44) -> str:
    """A bar chart with room for every count above its bar and every label under it
    (labels slanted, so that long bin names do not run into each other)."""
    peak = max(counts.values(), default=0) or 1
    top, plot, bottom = 22, 110, 58
    total_width = width * len(counts) + 20
    parts = [
        f'<svg width="{total_width}" height="{top + plot + bottom}" role="img" '
        f'aria-label="{escape(unit)} per bin">'
    ]
    for i, (name, count) in enumerate(counts.items()):
        height = round(plot * count / peak)
        x = 10 + i * width
        centre = x + (width - 8) / 2
        parts.append(
            f'<rect x="{x}" y="{top + plot - height}" width="{width - 8}" height="{height}" '
            f'fill="#3b7dd8"><title>{escape(name)}: {count} {escape(unit)}</title></rect>'
            f'<text x="{centre}" y="{top + plot - height - 5}" text-anchor="middle">{count}</text>'
            f'<text transform="translate({centre} {top + plot + 12}) rotate(-35)" '
            f'text-anchor="end">{escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def hu_chart(per_class: dict[str, list[int]]) -> str:
    """Share of voxels per 100-HU bin, one line per class (selected slices only)."""
    centres = [(lo + hi) / 2 for lo, hi in zip(HU_EDGES[:-1], HU_EDGES[1:], strict=True)]
    series = []
    for name, counts in per_class.items():
        total = sum(counts) or 1
        series.append(html_page.Series(name, centres, [c / total for c in counts]))
    return html_page.line_chart(
        series,
        title="HU of the selected slices (share of voxels per 100 HU)",
        x_label="HU (air −1000, lung −900…−500, soft tissue 0…100)",
        y_label="share of voxels",
    )


@dataclass
class SampleSlice:
    index: int  # 0-based position in the series
    selected: bool
    pixels: np.ndarray  # uint8 (size, size, 3): as cached, the lung outline drawn


@dataclass
class Sample:
    """One scan of a class: which slices were shown, and their cached pixels."""

    global_class: str
    scan_id: str
    n_slices: int
    start: int
    stop: int
    slices: list[SampleSlice] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "class": self.global_class,
            "scan_id": self.scan_id,
            "n_slices": self.n_slices,
            "selected": [self.start, self.stop],
            "shown_slices": [s.index for s in self.slices],
        }


def shown_indices(n: int, start: int, stop: int) -> list[int]:
    """The series' first and last slice, the first and last selected, and the middle one."""
    return sorted({0, start, (start + stop - 1) // 2, stop - 1, n - 1})


class SampleScans:
    """Keeps the first scans offered of each class, then renders the first one kept."""

    def __init__(self, per_class: int = 3) -> None:
        self.per_class = per_class  # candidates kept, in case the first is rejected later
        self._offered: dict[str, list[tuple[Scan, dict[str, object]]]] = {}

    def offer(self, scan: Scan, row: dict[str, object]) -> None:
        offered = self._offered.setdefault(str(row["global_class"] or "unlabelled"), [])
        if len(offered) < self.per_class:
            offered.append((scan, row))

    def render(
        self, norm: Normalization, size: int, kept: set[str], focus: LungFocus
    ) -> list[Sample]:
        """A :class:`Sample` per class (classes in the order first seen) of the scans whose
        id is in ``kept``, each shown slice with its lung mask's outline (the selected slices'
        mask as the cache stores it, the others' found on the slice alone), as the cache shows
        slices to the model (``focus``); a scan whose slices fail to load now is left out."""
        samples = []
        for name, offered in self._offered.items():
            candidates = [(scan, row) for scan, row in offered if row["scan_id"] in kept]
            if not candidates:
                continue
            scan, row = candidates[0]
            start = int(row["selected_start"])  # type: ignore[arg-type]
            stop = start + int(row["n_slices_selected"])  # type: ignore[arg-type]
            sample = Sample(name, str(row["scan_id"]), scan.n_slices, start, stop)
            pixel_mm = scan.spacing_mm[2]
            try:
                selected = segment_lungs(scan.load(start, stop), scan.intensity, pixel_mm)
                passed = not selected.warnings
                box = selected.crop_box() if focus.crop and passed else None
                only = focus.only and passed
                for index in shown_indices(scan.n_slices, start, stop):
                    hu = scan.load(index, index + 1)
                    if start <= index < stop:
                        mask = selected.mask[index - start : index - start + 1]
                    else:
                        mask = segment_lungs(hu, scan.intensity, pixel_mm).mask
                    shown = model_view(hu, mask, box, scan.intensity, pixel_mm, only)
                    pixels = to_cache_pixels(shown, norm, scan.intensity, size)
                    lungs = resize_mask(crop(mask, box, False), size)[0]
                    sample.slices.append(
                        SampleSlice(index, start <= index < stop, outlined(pixels[0], lungs))
                    )
            except ScanLoadError:
                continue
            samples.append(sample)
        return samples


def selection_svg(sample: Sample, width: int = 640) -> str:
    """The series as a bar of slices: selected ones green, shown ones ticked and numbered."""
    scale = width / sample.n_slices
    parts = [f'<svg width="{width + 20}" height="46" role="img" aria-label="slice selection">']
    for i in range(sample.n_slices):
        colour = _SELECTED if sample.start <= i < sample.stop else _OUTSIDE
        parts.append(
            f'<rect x="{10 + i * scale:.1f}" y="6" width="{max(scale - 1, 1):.1f}" height="16" '
            f'fill="{colour}"/>'
        )
    for shown in sample.slices:
        x = 10 + (shown.index + 0.5) * scale
        parts.append(
            f'<line x1="{x:.1f}" y1="2" x2="{x:.1f}" y2="26" stroke="#222" stroke-width="1.5"/>'
            f'<text x="{x:.1f}" y="40" text-anchor="middle">{shown.index + 1}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def sample_figures(samples: Sequence[Sample]) -> list[str]:
    """HTML of every sample: its selection bar and one captioned thumbnail per shown slice
    (a green frame: in the selection; grey: outside)."""
    if not samples:
        return [html_page.paragraph("No scan to show.")]
    parts = []
    for sample in samples:
        parts.append(
            html_page.heading(
                f"{sample.global_class}: scan {sample.scan_id}, {sample.n_slices} "
                f"slice{'s' if sample.n_slices != 1 else ''}, "
                + (
                    f"slices {sample.start + 1}–{sample.stop} selected"
                    if sample.stop - sample.start > 1
                    else f"slice {sample.start + 1} selected"
                )
            )
        )
        parts.append(selection_svg(sample))
        figures = []
        for shown in sample.slices:
            colour = _SELECTED if shown.selected else _OUTSIDE
            image = html_page.png_img(
                shown.pixels,
                f"slice {shown.index + 1} of {sample.scan_id}",
                style=f"border:4px solid {colour};width:{THUMBNAIL_PX}px",
            )
            where = "selected" if shown.selected else "not selected"
            figures.append(
                html_page.figure(image, f"slice {shown.index + 1} of {sample.n_slices}, {where}")
            )
        parts.append("<div>" + "".join(figures) + "</div>")
    return parts
