"""Render a run directory as one self-contained HTML page (RUN_DIR/report.html).

Sections: AUC and loss per round (the coordinator's central evaluation on external sets, the
sites' aggregated federated evaluation and training), participation and train metrics per
site and round (from metrics.jsonl and the model cards), the model card of the best round
(else the latest), and the cross-site matrix of ``cross_site.json`` when the run has one.
``cross_site.json`` holds ``sites`` (rows: whose test data), ``models`` (columns: "global"
and the sites' own models), and ``auc_covid`` and ``accuracy`` as rows × columns lists with
``null`` for absent cells.  See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from common import html
from common.cache import atomic_open
from server.checkpoints import CheckpointError, RunDirectory

console = Console(stderr=True, soft_wrap=True)  # paths in messages stay whole
SOURCES = ("train", "federated", "central")
CROSS_SITE = "cross_site.json"
CROSS_SITE_METRICS = {"auc_covid": "COVID-19 AUC", "accuracy": "accuracy (3 classes)"}
NOT_CURVES = {"num-examples", "round"}


class ReportError(ValueError):
    """A run directory cannot be reported: a file is missing or malformed."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="the coordinator's run directory")
    parser.add_argument("--out", type=Path, help="HTML file (default: RUN_DIR/report.html)")


def run(args: argparse.Namespace) -> int:
    try:
        page = render_run(args.run_dir)
    except (ReportError, CheckpointError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        return 2
    out = args.out or args.run_dir / "report.html"
    with atomic_open(out) as handle:
        handle.write(page)
    print(f"wrote {out}")
    return 0


def render_run(run_dir: Path) -> str:
    """The report page of ``run_dir``; ReportError or CheckpointError naming a bad file."""
    run_dir = RunDirectory(run_dir)
    lines = _metric_lines(run_dir)
    rounds = [line["round"] for line in lines]
    cards = {r: card for r in rounds if (card := run_dir.read_json(run_dir.card_path(r).name))}
    best = run_dir.read_json("best.json") or {}
    shown = best.get("round") if best.get("round") in cards else rounds[-1]
    best_text = f"{best.get('round')} by {best.get('metric')} = {best.get('value')}"
    summary = [
        ["rounds recorded", f"{rounds[0]}–{rounds[-1]} ({len(rounds)})"],
        ["best round", best_text if best else None],
    ]
    parts = [
        html.table(["", ""], summary),
        html.section(
            "Per round",
            _chart(lines, "auc_covid", "COVID-19 AUC per round", "AUC"),
            _chart(lines, "loss", "Loss per round", "cross entropy"),
        ),
        html.section("Participation per round", _participation(lines)),
        html.section("Train metrics per site", *_site_charts(cards)),
        html.section(f"Model card of round {shown}", _card(cards.get(shown))),
        html.section("Cross-site evaluation", *_cross_site(run_dir.path / CROSS_SITE)),
    ]
    return html.page(f"fedct run {run_dir.path.name}", parts)


def _metric_lines(run_dir: RunDirectory) -> list[dict[str, Any]]:
    path = run_dir.path / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{path}: missing; is {run_dir.path} a fedct run directory?")
    try:
        lines = run_dir.metrics()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: unreadable ({exc})") from exc
    if not lines:
        raise ReportError(f"{path}: no round recorded yet")
    if not all(isinstance(line, dict) and isinstance(line.get("round"), int) for line in lines):
        raise ReportError(f"{path}: every line must be a JSON object with an integer round")
    return sorted(lines, key=lambda line: line["round"])


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _chart(lines: list[dict[str, Any]], suffix: str, title: str, y_label: str) -> str:
    """One series per metric ending in ``suffix`` of each source (train, federated, central),
    named by what precedes the suffix (the external set or split) and the source."""
    keys = sorted(
        {
            (source, key)
            for line in lines
            for source in SOURCES
            if isinstance(line.get(source), dict)
            for key in line[source]
            if key.endswith(suffix)
        }
    )
    if not keys:
        return html.paragraph(f"No metric ending in {suffix} was recorded.")
    rounds = [line["round"] for line in lines]
    series = []
    for source, key in keys:
        prefix = key.removesuffix(suffix).rstrip("-_")
        values = [_number((line.get(source) or {}).get(key)) for line in lines]
        series.append(html.Series(f"{prefix} ({source})" if prefix else source, rounds, values))
    return html.line_chart(series, title=title, x_label="round", y_label=y_label)


def _participation(lines: list[dict[str, Any]]) -> str:
    sites = sorted({site for line in lines for site in line.get("sites") or {}})
    rows = [
        [
            line["round"],
            *((line.get("sites") or {}).get(site) for site in sites),
            line.get("failures"),
            line.get("kept_previous_model") or "",
        ]
        for line in lines
    ]
    note = html.paragraph(
        "Cells: scans each site trained on in that round; hatched: the site took no part."
    )
    return note + html.table(["round", *sites, "failures", "kept previous model"], rows)


def _site_charts(cards: dict[int, dict[str, Any]]) -> list[str]:
    """A chart per numeric train metric the sites reported, one series per site."""
    values: dict[str, dict[str, dict[int, float | None]]] = {}
    for server_round, card in sorted(cards.items()):
        for participant in (card.get("train") or {}).get("participants") or []:
            for name, value in (participant.get("metrics") or {}).items():
                if name not in NOT_CURVES and _number(value) is not None:
                    site = str(participant.get("site"))
                    values.setdefault(name, {}).setdefault(site, {})[server_round] = _number(value)
    if not values:
        return [html.paragraph("The model cards hold no per-site train metrics.")]
    rounds = sorted(cards)
    return [
        html.line_chart(
            [
                html.Series(site, rounds, [by_round.get(r) for r in rounds])
                for site, by_round in sorted(per_site.items())
            ],
            title=f"{name} per site",
            x_label="round",
            y_label=name,
        )
        for name, per_site in sorted(values.items())
    ]


def _card(card: dict[str, Any] | None) -> str:
    if card is None:
        return html.paragraph("No model card found for this round.")
    overview = [
        [key, card.get(key)]
        for key in ("round", "created", "strategy", "transport_dtype", "checkpoint", "sha256")
    ]
    parts = [html.table(["", ""], overview)]
    for key in ("model_config", "run_config", "operating_point", "central_evaluation"):
        if isinstance(card.get(key), dict) and card[key]:
            rows = [[name, _plain(value)] for name, value in sorted(card[key].items())]
            parts.append(html.heading(key) + html.table(["key", "value"], rows))
    parts.append(html.preformatted(json.dumps(card, indent=2, sort_keys=True), "the whole card"))
    return "\n".join(parts)


def _plain(value: Any) -> Any:
    return (
        value if value is None or isinstance(value, bool | int | float | str) else json.dumps(value)
    )


def _cross_site(path: Path) -> list[str]:
    if not path.exists():
        return [html.paragraph(f"This run has no {CROSS_SITE}.")]
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: unreadable ({exc})") from exc
    sites, models = _names(content, "sites", path), _names(content, "models", path)
    parts = [
        html.paragraph(
            "Rows: the site whose test data was scored; columns: the model scored (the global "
            "model, or a site's own). Hatched cells (—) are absent."
        )
    ]
    for key, title in CROSS_SITE_METRICS.items():
        matrix = content.get(key)
        if matrix is None:
            continue
        if not (
            isinstance(matrix, list)
            and len(matrix) == len(sites)
            and all(isinstance(row, list) and len(row) == len(models) for row in matrix)
            and all(v is None or _number(v) is not None for row in matrix for v in row)
        ):
            raise ReportError(
                f"{path}: {key} must be {len(sites)} rows (sites) of {len(models)} numbers or "
                "null (models)"
            )
        parts.append(html.heading(title))
        parts.append(html.heatmap_table(sites, models, matrix, corner="data ↓ / model →"))
    return parts


def _names(content: Any, key: str, path: Path) -> list[str]:
    names = content.get(key) if isinstance(content, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ReportError(f"{path}: {key} must be a non-empty list of names")
    return names
