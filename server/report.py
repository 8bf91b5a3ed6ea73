"""Render a run directory as one self-contained HTML page (RUN_DIR/report.html).

Sections: an overview (strategy, rounds, the best round, Flower run id, software); AUC and
loss per round (the coordinator's evaluation on the external sets, the sites' pooled
evaluation, training) with the chance line and the best round marked, and a numeric table of
every round; each round's federated operating point with the sensitivity and specificity at
it; each site's tune and test AUC per round with its 95 % CI (from the model cards);
participation and train metrics per site; the model card of the best round (else the
latest; the ``dp-*`` settings left out when DP was off); and the cross-site matrix of
``cross_site.json`` when the run has one, naming the round of its global model.  Every
sensitivity and specificity shown is at its round's operating point or names its threshold
(a ``…_at_0.5`` key, or a central evaluation without ``<set>-threshold``: at 0.5).
``cross_site.json`` holds ``sites`` (rows: whose test data), ``models`` (columns: "global"
and the sites' own models), ``global_round``, and ``auc_covid``, ``accuracy``, ``n`` as
rows × columns lists and ``auc_covid_ci`` as rows × columns [low, high] pairs, with ``null``
for absent cells.  See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from fedct.common import html_page
from fedct.common.cache.store import atomic_open
from fedct.common.run.directory import CheckpointError, RunDirectory, jsonable
from fedct.server.progress import external_sets, metric_label

console = Console(stderr=True, soft_wrap=True)  # paths in messages stay whole
SOURCES = ("train", "federated", "central")
SOURCE_NAMES = {"train": "train", "federated": "sites pooled", "central": "external"}
AUC = "-auc_covid"
DP_PREFIX = "dp-"
CROSS_SITE = "cross_site.json"
CROSS_SITE_METRICS = {"auc_covid": "COVID-19 AUC", "accuracy": "accuracy (3 classes)"}
NOT_CURVES = {"num-examples", "round"}  # not drawn per site
RATES = ("sens_covid", "spec_covid")
AT_HALF = "_at_0.5"  # a rate at the fixed 0.5, where no operating point was known
THRESHOLD = "-threshold"  # <set>-threshold: the threshold a central evaluation's rates are at


class ReportError(ValueError):
    """A run directory cannot be reported: a file is missing or malformed."""


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
    best_round = best.get("round")
    shown = best_round if best_round in cards else rounds[-1]
    marker = (best_round, f"best: round {best_round}") if best_round is not None else None
    parts = [
        html_page.facts(_overview(run_dir, lines, cards, best)),
        html_page.section(
            "Per round",
            _chart(lines, AUC, "COVID-19 AUC per round", "AUC", marker, chance=True),
            _chart(lines, "loss", "Loss per round", "cross entropy", marker),
            html_page.heading("Every round"),
            _round_table(lines, best_round),
        ),
        html_page.section("Operating point per round", *_operating_points(lines, cards)),
        html_page.section(
            "Tune and test AUC per site",
            html_page.paragraph(
                "Each site scores the global model of every round on its own tune and test "
                "splits (from the model cards); the dashed line is chance (AUC 0.5)."
            ),
            *_site_evaluation_charts(cards, marker),
        ),
        html_page.section("Participation per round", _participation(lines)),
        html_page.section("Train metrics per site", *_site_charts(cards, marker)),
        html_page.section(f"Model card of round {shown}", _card(cards.get(shown))),
        html_page.section(
            "Cross-site evaluation",
            *_cross_site(run_dir.path / CROSS_SITE, shown, shown == best_round),
        ),
    ]
    return html_page.page(f"fedct run {run_dir.path.name}", parts)


def _fmt(value: Any, digits: int = 3) -> float | None:
    """``value`` rounded for a table cell, None when it is not a finite number."""
    number = _number(value)
    return None if number is None else round(number, digits)


def _overview(
    run_dir: RunDirectory,
    lines: list[dict[str, Any]],
    cards: dict[int, dict[str, Any]],
    best: dict[str, Any],
) -> list[list[Any]]:
    rounds = [line["round"] for line in lines]
    last = cards.get(rounds[-1]) or {}
    recorded = run_dir.read_json("run_config.json") or {}
    best_text = None
    if best:
        best_text = (
            f"round {best.get('round')}: {metric_label(str(best.get('metric')))} "
            f"{_fmt(best.get('value')):.3f} ({best.get('checkpoint')})"
        )
    software = last.get("software") or {}
    return [
        ["strategy", last.get("strategy")],
        ["rounds recorded", f"{rounds[0]}–{rounds[-1]} ({len(rounds)})"],
        ["best round", best_text],
        [
            "Flower run id",
            recorded.get("flower_run_id", (last.get("run") or {}).get("flower_run_id")),
        ],
        ["software", ", ".join(f"{k} {v}" for k, v in software.items()) or None],
    ]


def _round_table(lines: list[dict[str, Any]], best_round: int | None) -> str:
    """A row per round: sites, failures, train loss, pooled tune/test AUC, each external
    set's AUC and loss, seconds; the best round's row marked."""
    sets = sorted({name for line in lines for name in external_sets(line)})
    header = ["round", "sites", "failures", "train loss", "tune AUC", "test AUC"]
    header += [f"{name} {kind}" for name in sets for kind in ("AUC", "loss")]
    header += ["seconds", ""]
    rows, marked = [], []
    for line in lines:
        federated, central = line.get("federated") or {}, line.get("central") or {}
        if line["round"] == best_round:
            marked.append(len(rows))
        row = [
            line["round"],
            len(line.get("sites") or {}),
            line.get("failures"),
            _fmt((line.get("train") or {}).get("train-loss")),
            _fmt(federated.get("tune" + AUC)),
            _fmt(federated.get("test" + AUC)),
        ]
        for name in sets:
            row += [_fmt(central.get(name + AUC)), _fmt(central.get(f"{name}-loss"))]
        row += [_fmt(line.get("seconds"), 1), "◀ best" if line["round"] == best_round else ""]
        rows.append(row)
    return html_page.table(header, rows, marked=marked)


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


Marker = tuple[int, str] | None  # (round, label) of the best round's line on the charts


def _chart(
    lines: list[dict[str, Any]],
    suffix: str,
    title: str,
    y_label: str,
    marker: Marker,
    *,
    chance: bool = False,
) -> str:
    """One series per metric ending in ``suffix`` of each source (train, federated, central),
    named by what precedes the suffix (the external set or split) and the source; the best
    round marked, and with ``chance`` the AUC of a coin flip."""
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
        return html_page.paragraph(f"No metric ending in {suffix} was recorded.")
    rounds = [line["round"] for line in lines]
    series = []
    for source, key in keys:
        prefix = key.removesuffix(suffix).rstrip("-_")
        values = [_number((line.get(source) or {}).get(key)) for line in lines]
        name = f"{prefix} ({SOURCE_NAMES[source]})" if prefix else SOURCE_NAMES[source]
        series.append(html_page.Series(name, rounds, values))
    return _rounds_chart(series, title, y_label, marker, chance)


def _rounds_chart(
    series: list[html_page.Series], title: str, y_label: str, marker: Marker, chance: bool
) -> str:
    return html_page.line_chart(
        series,
        title=title,
        x_label="round",
        y_label=y_label,
        hline=(0.5, "chance") if chance else None,
        vline=marker,
        integer_x=True,
    )


def _per_site(cards: dict[int, dict[str, Any]], entries_of: Any) -> dict[str, dict[str, dict]]:
    """{metric: {site: {round: value}}} of the numeric metrics ``entries_of(card)`` lists as
    (site, metrics) pairs."""
    values: dict[str, dict[str, dict[int, float | None]]] = {}
    for server_round, card in sorted(cards.items()):
        for site, metrics in entries_of(card):
            for name, value in (metrics or {}).items():
                if name not in NOT_CURVES and _number(value) is not None:
                    values.setdefault(name, {}).setdefault(str(site), {})[server_round] = _number(
                        value
                    )
    return values


def _site_evaluation_charts(cards: dict[int, dict[str, Any]], marker: Marker) -> list[str]:
    """Tune and test AUC of every site per round, with the site's 95 % CI as a band."""
    values = _per_site(
        cards,
        lambda card: [
            (entry.get("site"), entry.get("metrics"))
            for entry in (card.get("federated_evaluation") or {}).get("sites") or []
        ],
    )
    rounds = sorted(cards)
    charts = []
    for split in ("tune", "test"):
        per_site = values.get(f"{split}{AUC}")
        if not per_site:
            charts.append(html_page.paragraph(f"No site reported a {split} AUC."))
            continue
        low, high = values.get(f"{split}{AUC}_low", {}), values.get(f"{split}{AUC}_high", {})
        series = [
            html_page.Series(
                site,
                rounds,
                [by_round.get(r) for r in rounds],
                [low.get(site, {}).get(r) for r in rounds] if site in low else None,
                [high.get(site, {}).get(r) for r in rounds] if site in high else None,
            )
            for site, by_round in sorted(per_site.items())
        ]
        charts.append(
            _rounds_chart(series, f"{split} AUC per site (band: 95% CI)", "AUC", marker, True)
        )
    return charts


def threshold_of(metrics: dict[str, Any], key: str) -> str | None:
    """The threshold of a sensitivity or specificity key of ``metrics``, as a label: "0.5"
    for a ``…_at_0.5`` key, else its set's ``<set>-threshold`` (0.5 in runs recorded before
    fedct recorded it); None for a key that is no sensitivity or specificity."""
    if key.endswith(AT_HALF):
        return "0.5"
    prefix, _, rate = key.rpartition("-")
    if rate not in RATES:
        return None
    threshold = _number(metrics.get(f"{prefix}{THRESHOLD}"))
    return "0.5" if threshold is None else f"{threshold:.4g}"


def labelled_thresholds(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` with every sensitivity and specificity key named with its threshold."""
    out = {}
    for key, value in metrics.items():
        threshold = threshold_of(metrics, key)
        named = key.removesuffix(AT_HALF)
        out[f"{named} (at {threshold})" if threshold is not None else key] = value
    return out


def _operating_points(lines: list[dict[str, Any]], cards: dict[int, dict[str, Any]]) -> list[str]:
    """Each round's federated operating point, the pooled tune sensitivity and specificity
    it was chosen for, and each external set's at that threshold."""
    sets = sorted({name for line in lines for name in external_sets(line)})
    header = ["round", "threshold", "rule", "chosen on", "tune sensitivity", "tune specificity"]
    header += [f"{name} {rate}" for name in sets for rate in ("sensitivity", "specificity")]
    rows = []
    for line in lines:
        op = (cards.get(line["round"]) or {}).get("operating_point")
        if not isinstance(op, dict):
            continue
        central = line.get("central") or {}
        row = [
            line["round"],
            _fmt(op.get("threshold"), 4),
            op.get("rule"),
            op.get("chosen_on"),
            _fmt(op.get("sensitivity")),
            _fmt(op.get("specificity")),
        ]
        for name in sets:
            at = _number(central.get(f"{name}{THRESHOLD}"))
            same = at is not None and at == _number(op.get("threshold"))
            row += [_fmt(central.get(f"{name}-{rate}")) if same else None for rate in RATES]
        rows.append(row)
    if not rows:
        return [html_page.paragraph("No round chose an operating point.")]
    return [
        html_page.paragraph(
            "Each round's COVID-19 threshold, chosen on the sites' tune histograms of "
            "p(COVID-19) summed (docs/evaluation.md), the pooled tune sensitivity and "
            "specificity it was chosen for, and each external set's at that threshold (—: the "
            "round's central evaluation was not at it). Every sensitivity and specificity of "
            "this report is at its round's threshold or names its own: the sites' tune and "
            "test figures are scored before the round's threshold exists, at 0.5."
        ),
        html_page.table(header, rows),
    ]


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
    note = html_page.paragraph(
        "Cells: scans each site trained on in that round; hatched: the site took no part."
    )
    return note + html_page.table(["round", *sites, "failures", "kept previous model"], rows)


def _site_charts(cards: dict[int, dict[str, Any]], marker: Marker) -> list[str]:
    """A chart per numeric train metric the sites reported, one series per site."""
    values = _per_site(
        cards,
        lambda card: [
            (p.get("site"), p.get("metrics"))
            for p in (card.get("train") or {}).get("participants") or []
        ],
    )
    if not values:
        return [html_page.paragraph("The model cards hold no per-site train metrics.")]
    rounds = sorted(cards)
    return [
        _rounds_chart(
            [
                html_page.Series(site, rounds, [by_round.get(r) for r in rounds])
                for site, by_round in sorted(per_site.items())
            ],
            f"{name} per site",
            name,
            marker,
            False,
        )
        for name, per_site in sorted(values.items())
    ]


def shown_run_config(run_config: dict[str, Any]) -> dict[str, Any]:
    """The run config as a report shows it: without the ``dp-*`` keys when DP was off."""
    if run_config.get("dp"):
        return dict(run_config)
    return {k: v for k, v in run_config.items() if not k.startswith(DP_PREFIX)}


def _card(card: dict[str, Any] | None) -> str:
    if card is None:
        return html_page.paragraph("No model card found for this round.")
    run = card.get("run") or {}
    overview = [
        ["round", card.get("round")],
        ["created", card.get("created")],
        ["strategy", card.get("strategy")],
        ["transport dtype", card.get("transport_dtype")],
        ["checkpoint", card.get("checkpoint")],
        ["sha256", card.get("sha256")],
        ["Flower run id", run.get("flower_run_id")],
        ["software", ", ".join(f"{k} {v}" for k, v in (card.get("software") or {}).items())],
    ]
    parts = [html_page.facts([row for row in overview if row[1] not in (None, "")])]
    sections = {
        "model config": card.get("model_config"),
        "run config": shown_run_config(card.get("run_config") or {}),
        "operating point": card.get("operating_point"),
        "calibration": card.get("calibration"),
        "central evaluation": labelled_thresholds(card.get("central_evaluation") or {}),
    }
    for title, content in sections.items():
        if isinstance(content, dict) and content:
            rows = [[name, _plain(value)] for name, value in sorted(content.items())]
            parts.append(html_page.heading(title) + html_page.table(["key", "value"], rows))
    if not (card.get("run_config") or {}).get("dp"):
        parts.append(
            html_page.paragraph("DP was off; the dp-* settings are left out.", warning=False)
        )
    parts.append(
        html_page.preformatted(json.dumps(card, indent=2, sort_keys=True), "the whole card")
    )
    return "\n".join(parts)


def _plain(value: Any) -> Any:
    """A card value for a table cell: numbers to 4 significant digits, lists as JSON."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if value is None or isinstance(value, bool | int | str):
        return value
    return json.dumps(jsonable(value))


def _cell_notes(
    content: dict[str, Any], sites: list[str], models: list[str]
) -> list[list[str | None]]:
    """Each cross-site cell's "n = …, 95% CI …–…" (what the site reported)."""
    counts = content.get("n") or [[None] * len(models) for _ in sites]
    intervals = content.get("auc_covid_ci") or [[None] * len(models) for _ in sites]
    notes: list[list[str | None]] = []
    for count_row, ci_row in zip(counts, intervals, strict=False):
        row: list[str | None] = []
        for count, ci in zip(count_row, ci_row, strict=False):
            text = [f"n = {int(count)}"] if _number(count) is not None else []
            if isinstance(ci, list) and len(ci) == 2 and all(_number(v) is not None for v in ci):
                # A zero-width interval (too few scans to vary) is no certainty: say so.
                equal = ci[0] == ci[1]
                text.append(
                    "no CI: every resample equal" if equal else f"CI {ci[0]:.2f}–{ci[1]:.2f}"
                )
            row.append(", ".join(text) or None)
        notes.append(row)
    return notes


def _cross_site(path: Path, card_round: int, card_is_best: bool) -> list[str]:
    if not path.exists():
        return [html_page.paragraph(f"This run has no {CROSS_SITE}.")]
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: unreadable ({exc})") from exc
    sites, models = _names(content, "sites", path), _names(content, "models", path)
    global_round = content.get("global_round") if isinstance(content, dict) else None
    columns = [
        (f"global (round {global_round})" if global_round is not None else "global (final)")
        if model == "global"
        else f"{model}'s own"
        for model in models
    ]
    parts = [
        html_page.paragraph(
            "Rows: the site whose test split was scored; columns: the model scored — the "
            "global model after the last round, or a site's own model (its weights after the "
            "last round it trained in). Under each AUC: the scans scored (n) and the site's "
            "patient-level bootstrap 95% CI. Hatched cells (—) are absent."
        ),
        html_page.paragraph(_cross_site_round(global_round, card_round, card_is_best)),
    ]
    notes = _cell_notes(content, sites, models)
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
        parts.append(html_page.heading(title))
        parts.append(
            html_page.heatmap_table(
                sites,
                columns,
                matrix,
                corner="test data of ↓ / model →",
                notes=notes if key == "auc_covid" else None,
            )
        )
    return parts


def _cross_site_round(global_round: Any, card_round: int, card_is_best: bool) -> str:
    """Which round's global model the matrix scored, beside the round of the card above."""
    which = "the best round's" if card_is_best else "the latest round's"
    if global_round is None:
        return (
            f"The global model scored here is the final round's; the model card above is "
            f"{which}, round {card_round}."
        )
    if global_round == card_round:
        return f"The global model scored here is round {global_round}'s, the card's above."
    return (
        f"The global model scored here is round {global_round}'s (the last round); the model "
        f"card above is {which}, round {card_round}: its AUCs here are not this matrix's."
    )


def _names(content: Any, key: str, path: Path) -> list[str]:
    names = content.get(key) if isinstance(content, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ReportError(f"{path}: {key} must be a non-empty list of names")
    return names
