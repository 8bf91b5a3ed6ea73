"""Self-contained HTML pages: tables, inline SVG charts and PNG images embedded as base64.

A page built here references no file and no network address (no scripts, no stylesheets,
no ``src``/``href`` outside ``data:`` URIs), so it can be mailed or archived as one file.
Charts: a line chart with optional confidence bands, an ROC curve with its band and a marked
operating point, and a reliability diagram; tables: plain, and heat-map tables whose absent
cells are marked.  Every text is HTML-escaped here; callers pass plain strings.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html import escape

import numpy as np
from PIL import Image

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
ABSENT = "—"
_WIDTH, _HEIGHT = 520, 340
_LEFT, _RIGHT, _TOP, _BOTTOM = 58, 150, 30, 46
_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}
h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em}
th{background:#f3f3f3;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.absent{color:#999;text-align:center;
 background:repeating-linear-gradient(45deg,#fafafa,#fafafa 4px,#eee 4px,#eee 8px)}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:.5em .8em}
figure{display:inline-block;margin:.5em;vertical-align:top}
figcaption{font-size:.85em;max-width:280px}
figure img{width:256px;image-rendering:pixelated}svg text{font-size:11px;fill:#333}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.85em}
details{margin:.4em 0}summary{cursor:pointer}
tr.best td{font-weight:600;background:#eef6ee}.note{color:#555;font-size:.9em}
"""


@dataclass(frozen=True)
class Series:
    """One line of a chart; ``None`` or NaN values leave a gap.  ``low``/``high``: a band."""

    name: str
    x: Sequence[float]
    y: Sequence[float | None]
    low: Sequence[float | None] | None = None
    high: Sequence[float | None] | None = None


def page(title: str, parts: Iterable[str]) -> str:
    """A complete HTML document of ``parts`` (already HTML) under an escaped ``title``."""
    body = "\n".join(parts)
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>\n"
        f"<body><h1>{escape(title)}</h1>\n{body}\n</body></html>\n"
    )


def section(title: str, *parts: str) -> str:
    return f"<section><h2>{escape(title)}</h2>\n" + "\n".join(parts) + "\n</section>"


def heading(text: str) -> str:
    """A sub-heading within a section."""
    return f"<h3>{escape(text)}</h3>"


def paragraph(text: str, *, warning: bool = False) -> str:
    return f'<p class="warn">{escape(text)}</p>' if warning else f"<p>{escape(text)}</p>"


def preformatted(text: str, summary: str) -> str:
    """Collapsed preformatted text (e.g. a JSON document) under a one-line ``summary``."""
    return f"<details><summary>{escape(summary)}</summary><pre>{escape(text)}</pre></details>"


def details(summary: str, *parts: str, open_: bool = False) -> str:
    """Collapsed HTML ``parts`` under a one-line ``summary`` (open with ``open_``)."""
    flag = " open" if open_ else ""
    return (
        f"<details{flag}><summary>{escape(summary)}</summary>\n" + "\n".join(parts) + "</details>"
    )


def facts(rows: Iterable[Sequence[object]]) -> str:
    """A two-column table of (name, value) rows, without a header row."""
    body = "".join(f"<tr><th>{escape(str(name))}</th>{_cell(value)}</tr>\n" for name, value in rows)
    return f"<table><tbody>\n{body}</tbody></table>"


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f'<td class="absent">{ABSENT}</td>'
    if isinstance(value, bool | str):
        return f"<td>{escape(str(value))}</td>"
    if isinstance(value, float):
        return f'<td class="num">{value:.4g}</td>'
    if isinstance(value, int):
        return f'<td class="num">{value}</td>'
    return f"<td>{escape(str(value))}</td>"


def table(
    header: Sequence[str], rows: Iterable[Sequence[object]], *, marked: Iterable[int] = ()
) -> str:
    """A table; floats shown to 4 significant digits, None/NaN as a marked absent cell; the
    rows whose index is in ``marked`` are highlighted."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    chosen = set(marked)
    body = "".join(
        ('<tr class="best">' if i in chosen else "<tr>")
        + "".join(_cell(v) for v in row)
        + "</tr>\n"
        for i, row in enumerate(rows)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>"


def heatmap_table(
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    values: Sequence[Sequence[float | None]],
    *,
    corner: str = "",
    digits: int = 3,
    notes: Sequence[Sequence[str | None]] | None = None,
) -> str:
    """A matrix as a table whose cells are shaded from its smallest (light) to largest value.

    None or NaN cells are absent: hatched and shown as an em dash.  Values are shown with
    ``digits`` decimals (0 for counts); ``notes`` (same shape) adds a small second line to
    a cell (e.g. its n and CI).
    """
    finite = [v for row in values for v in row if v is not None and math.isfinite(v)]
    top = max(finite, default=0.0)
    low = min(finite, default=0.0)
    head = f"<th>{escape(corner)}</th>" + "".join(f"<th>{escape(c)}</th>" for c in col_labels)
    lines = []
    for r, (label, row) in enumerate(zip(row_labels, values, strict=True)):
        cells = []
        for c, value in enumerate(row):
            if value is None or not math.isfinite(value):
                cells.append(f'<td class="absent" title="absent">{ABSENT}</td>')
                continue
            share = (value - low) / (top - low) if top > low else 0.0
            shade = f"rgba(31,119,180,{0.08 + 0.72 * share:.2f})"
            ink = "#fff" if share > 0.6 else "#222"
            note = notes[r][c] if notes is not None else None
            small = f"<br><small>{escape(note)}</small>" if note else ""
            cells.append(
                f'<td class="num" style="background:{shade};color:{ink}">'
                f"{value:.{digits}f}{small}</td>"
            )
        lines.append(f"<tr><th>{escape(label)}</th>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(lines) + "</tbody></table>"


def png_img(pixels: np.ndarray, alt: str, *, max_side: int = 256, style: str = "") -> str:
    """An ``<img>`` holding a grey (H, W) or RGB (H, W, 3) uint8 picture as an embedded PNG,
    shrunk so that its longer side is at most ``max_side``; ``style``: its inline CSS."""
    image = Image.fromarray(np.ascontiguousarray(pixels))
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    css = f' style="{escape(style)}"' if style else ""
    return f'<img alt="{escape(alt)}"{css} src="data:image/png;base64,{data}">'


def figure(content: str, caption: str) -> str:
    return f"<figure>{content}<figcaption>{escape(caption)}</figcaption></figure>"


def _nice_step(span: float, target: int) -> float:
    raw = span / max(target, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1.0, 2.0, 5.0, 10.0) if m * power >= raw * (1 - 1e-9))


def _ticks(low: float, high: float, target: int = 5) -> list[float]:
    step = _nice_step(high - low, target)
    first = math.ceil(low / step - 1e-9) * step
    count = int(math.floor((high - first) / step + 1e-9)) + 1
    return [round(first + i * step, 10) for i in range(count)]


def _span(values: Iterable[float | None], pad: float = 0.05) -> tuple[float, float]:
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    low, high = min(finite), max(finite)
    if high == low:
        return low - 0.5, high + 0.5
    margin = (high - low) * pad
    return low - margin, high + margin


def _defined(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


class _Plot:
    """Data → pixel mapping of one SVG chart and the pieces drawn on it."""

    def __init__(self, x_range: tuple[float, float], y_range: tuple[float, float]) -> None:
        self.x0, self.x1 = x_range
        self.y0, self.y1 = y_range
        self.inner_w = _WIDTH - _LEFT - _RIGHT
        self.inner_h = _HEIGHT - _TOP - _BOTTOM
        self.items: list[str] = []

    def px(self, x: float) -> float:
        return _LEFT + (x - self.x0) / (self.x1 - self.x0) * self.inner_w

    def py(self, y: float) -> float:
        return _TOP + (self.y1 - y) / (self.y1 - self.y0) * self.inner_h

    def axes(self, x_label: str, y_label: str, *, integer_x: bool = False) -> None:
        bottom, right = _TOP + self.inner_h, _LEFT + self.inner_w
        x_ticks = _ticks(self.x0, self.x1)
        if integer_x:  # e.g. rounds: no tick between two rounds
            step = max(1, round(x_ticks[1] - x_ticks[0]) if len(x_ticks) > 1 else 1)
            x_ticks = list(range(math.ceil(self.x0), math.floor(self.x1) + 1, step))
        for x in x_ticks:
            self.items.append(
                f'<line x1="{self.px(x):.1f}" y1="{_TOP}" x2="{self.px(x):.1f}" y2="{bottom}" '
                f'stroke="#eee"/><text x="{self.px(x):.1f}" y="{bottom + 15}" '
                f'text-anchor="middle">{x:g}</text>'
            )
        for y in _ticks(self.y0, self.y1):
            self.items.append(
                f'<line x1="{_LEFT}" y1="{self.py(y):.1f}" x2="{right}" y2="{self.py(y):.1f}" '
                f'stroke="#eee"/><text x="{_LEFT - 6}" y="{self.py(y) + 4:.1f}" '
                f'text-anchor="end">{y:g}</text>'
            )
        self.items.append(
            f'<rect x="{_LEFT}" y="{_TOP}" width="{self.inner_w}" height="{self.inner_h}" '
            f'fill="none" stroke="#888"/>'
            f'<text x="{_LEFT + self.inner_w / 2:.1f}" y="{_HEIGHT - 8}" '
            f'text-anchor="middle">{escape(x_label)}</text>'
            f'<text transform="translate(14 {_TOP + self.inner_h / 2:.1f}) rotate(-90)" '
            f'text-anchor="middle">{escape(y_label)}</text>'
        )

    def line(
        self,
        xs: Sequence[float],
        ys: Sequence[float | None],
        colour: str,
        *,
        markers: bool = False,
        **attrs: str,
    ) -> None:
        """A polyline per run of defined points; a dot on every point with ``markers``, else
        on isolated points only (which a polyline cannot show)."""
        extra = "".join(f' {k.replace("_", "-")}="{v}"' for k, v in attrs.items())
        run: list[str] = []
        for x, y in [*zip(xs, ys, strict=True), (math.nan, None)]:
            if _defined(y) and _defined(x):
                run.append(f"{self.px(x):.1f},{self.py(float(y)):.1f}")
                continue
            for point in run if markers or len(run) == 1 else ():
                cx, cy = point.split(",")
                self.items.append(f'<circle cx="{cx}" cy="{cy}" r="3" fill="{colour}"/>')
            if len(run) > 1:
                self.items.append(
                    f'<polyline points="{" ".join(run)}" fill="none" stroke="{colour}" '
                    f'stroke-width="2"{extra}/>'
                )
            run = []

    def band(
        self,
        xs: Sequence[float],
        low: Sequence[float | None],
        high: Sequence[float | None],
        colour: str,
    ) -> None:
        kept = [(x, lo, hi) for x, lo, hi in zip(xs, low, high, strict=True) if _defined(lo)]
        kept = [(x, lo, hi) for x, lo, hi in kept if _defined(hi)]
        if len(kept) < 2:
            return
        upper = [f"{self.px(x):.1f},{self.py(hi):.1f}" for x, _, hi in kept]
        lower = [f"{self.px(x):.1f},{self.py(lo):.1f}" for x, lo, _ in reversed(kept)]
        self.items.append(
            f'<polygon points="{" ".join(upper + lower)}" fill="{colour}" fill-opacity="0.18" '
            f'stroke="none"/>'
        )

    def diagonal(self) -> None:
        self.line([0.0, 1.0], [0.0, 1.0], "#999", stroke_dasharray="4 4")

    def reference(self, *, y: float | None = None, x: float | None = None, label: str) -> None:
        """A dashed horizontal line at ``y`` or vertical line at ``x``, labelled inside the
        frame; nothing when it lies outside the plotted range."""
        if y is not None and self.y0 <= y <= self.y1:
            py = self.py(y)
            self.items.append(
                f'<line x1="{_LEFT}" y1="{py:.1f}" x2="{_LEFT + self.inner_w}" y2="{py:.1f}" '
                f'stroke="#888" stroke-dasharray="5 4"/><text x="{_LEFT + self.inner_w - 4}" '
                f'y="{py - 4:.1f}" text-anchor="end" style="fill:#666">{escape(label)}</text>'
            )
        if x is not None and self.x0 <= x <= self.x1:
            px = self.px(x)
            # The label goes on the side of the line with more room inside the frame.
            anchor, dx = ("end", -4) if px > _LEFT + self.inner_w / 2 else ("start", 4)
            self.items.append(
                f'<line x1="{px:.1f}" y1="{_TOP}" x2="{px:.1f}" y2="{_TOP + self.inner_h}" '
                f'stroke="#2ca02c" stroke-width="1.5" stroke-dasharray="6 3"/>'
                f'<text x="{px + dx:.1f}" y="{_TOP + 12}" text-anchor="{anchor}" '
                f'style="fill:#2ca02c">{escape(label)}</text>'
            )

    def legend(self, entries: Sequence[tuple[str, str]]) -> None:
        x = _LEFT + self.inner_w + 10
        for i, (name, colour) in enumerate(entries):
            y = _TOP + 8 + 16 * i
            self.items.append(
                f'<rect x="{x}" y="{y - 8}" width="12" height="4" fill="{colour}"/>'
                f'<text x="{x + 16}" y="{y - 3}">{escape(_shorten(name))}</text>'
            )

    def svg(self, title: str) -> str:
        return (
            f'<svg role="img" aria-label="{escape(title)}" width="{_WIDTH}" height="{_HEIGHT}" '
            f'viewBox="0 0 {_WIDTH} {_HEIGHT}"><title>{escape(title)}</title>'
            f'<text x="{_LEFT}" y="18" style="font-size:13px;font-weight:600">{escape(title)}'
            f"</text>{''.join(self.items)}</svg>"
        )


def _shorten(text: str, limit: int = 22) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    y_range: tuple[float, float] | None = None,
    hline: tuple[float, str] | None = None,
    vline: tuple[float, str] | None = None,
    integer_x: bool = False,
) -> str:
    """An SVG line chart of ``series`` (each with its optional band) and a legend.

    ``hline`` / ``vline``: (value, label) of a dashed reference line (e.g. chance at AUC 0.5,
    the best round); ``integer_x``: ticks on whole numbers only (rounds)."""
    xs = [float(x) for s in series for x in s.x]
    ys = [v for s in series for v in (*s.y, *(s.low or ()), *(s.high or ()))]
    if hline is not None:
        ys = [*ys, hline[0]]
    plot = _Plot(_span(xs, pad=0.02), y_range or _span(ys))
    plot.axes(x_label, y_label, integer_x=integer_x)
    if hline is not None:
        plot.reference(y=hline[0], label=hline[1])
    if vline is not None:
        plot.reference(x=vline[0], label=vline[1])
    for i, s in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        if s.low is not None and s.high is not None:
            plot.band(s.x, s.low, s.high, colour)
        plot.line(s.x, s.y, colour, markers=True)
    plot.legend([(s.name, PALETTE[i % len(PALETTE)]) for i, s in enumerate(series)])
    return plot.svg(title)


def roc_chart(
    fpr: Sequence[float],
    tpr: Sequence[float],
    *,
    title: str,
    band: tuple[Sequence[float], Sequence[float], Sequence[float]] | None = None,
    point: tuple[float, float, str] | None = None,
) -> str:
    """An SVG ROC curve.  ``band``: (fpr grid, tpr low, tpr high) drawn shaded behind it;
    ``point``: (fpr, tpr, label) of an operating point, marked with a ring and its label."""
    plot = _Plot((0.0, 1.0), (0.0, 1.0))
    plot.axes("1 − specificity (false-positive rate)", "sensitivity")
    plot.diagonal()
    entries = [("ROC", PALETTE[0])]
    if band is not None:
        plot.band(*band, PALETTE[0])
        entries.append(("95% CI band", "#b5d0e6"))
    plot.line(fpr, tpr, PALETTE[0])
    if point is not None and _defined(point[0]) and _defined(point[1]):
        x, y = plot.px(point[0]), plot.py(point[1])
        # The label goes to the side and height of the point with more room inside the frame.
        anchor, dx = ("start", 9) if point[0] < 0.6 else ("end", -9)
        dy = 18 if point[1] > 0.9 else -10
        plot.items.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="none" stroke="{PALETTE[1]}" '
            f'stroke-width="2.5"/><text x="{x + dx:.1f}" y="{y + dy:.1f}" '
            f'text-anchor="{anchor}">{escape(point[2])}</text>'
        )
        entries.append(("operating point", PALETTE[1]))
    plot.legend(entries)
    return plot.svg(title)


def reliability_chart(
    mean_predicted: Sequence[float | None],
    fraction_positive: Sequence[float | None],
    counts: Sequence[int],
    *,
    title: str,
    x_label: str,
    y_label: str,
) -> str:
    """An SVG reliability diagram: one dot per non-empty bin, its area proportional to its
    scan count, joined by a line, with the diagonal of perfect calibration."""
    plot = _Plot((0.0, 1.0), (0.0, 1.0))
    plot.axes(x_label, y_label)
    plot.diagonal()
    plot.line(mean_predicted, fraction_positive, PALETTE[0])
    largest = max(counts, default=0) or 1
    for x, y, n in zip(mean_predicted, fraction_positive, counts, strict=True):
        if n and _defined(x) and _defined(y):
            radius = 2.5 + 6.0 * math.sqrt(n / largest)
            plot.items.append(
                f'<circle cx="{plot.px(x):.1f}" cy="{plot.py(y):.1f}" r="{radius:.1f}" '
                f'fill="{PALETTE[0]}" fill-opacity="0.6"><title>{n} scans</title></circle>'
            )
    plot.legend([("bins (area ∝ scans)", PALETTE[0]), ("perfect calibration", "#999")])
    return plot.svg(title)
