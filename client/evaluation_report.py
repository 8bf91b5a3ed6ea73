"""The self-contained ``report.html`` of ``fedct evaluate``: ROC with its CI band and the
operating point, confusion matrix, per-class table, calibration, CAM overlays."""

from __future__ import annotations

from typing import Any

import numpy as np

from common import html
from common.classes import GLOBAL_CLASSES

UNTUNED = "fixed 0.5, not tuned"


def ci_text(entry: dict[str, Any] | None) -> str:
    if entry is None or entry["value"] is None:
        return html.ABSENT
    low, high = entry["ci"]
    interval = "" if low is None else f" (95% CI {low:.3f}–{high:.3f})"
    return f"{entry['value']:.3f}{interval}"


def render_report(report: dict[str, Any], cams: dict[str, list[str]]) -> str:
    metrics = report["metrics"]
    op = report["operating_point"]
    data = report["data"]
    parts = [
        html.table(
            ["", ""],
            [
                ["model card", f"{report['model']['card']} (round {report['model']['round']})"],
                ["weights sha256", report["model"]["sha256"]],
                ["data", f"{data['name']} ({data['kind']}, splits: {_splits_text(data)})"],
                ["scans / patients", f"{report['n_scans']} / {report['n_patients']}"],
                ["operating point", _op_text(op, report["operating_point_source"])],
            ],
        ),
        *(html.paragraph(note, warning=True) for note in report["notes"]),
        html.section("ROC curve: COVID-19 vs rest", _roc(report)),
        html.section(
            "Metrics with patient-bootstrap 95% CIs",
            html.table(
                ["metric", "value", "CI low", "CI high", "resamples"],
                [
                    [key, e["value"], e["ci"][0], e["ci"][1], e["n_valid"]]
                    for key, e in metrics.items()
                    if not isinstance(e["value"], list)
                ],
            ),
        ),
        html.section("Per class", _per_class(report)),
        html.section(
            "Confusion matrices",
            html.heatmap_table(
                GLOBAL_CLASSES,
                GLOBAL_CLASSES,
                metrics["confusion_3x3"]["value"],
                corner="true ↓ / predicted (argmax) →",
                digits=0,
            ),
            html.heatmap_table(
                ["other", "covid19"],
                ["called other", "called covid19"],
                metrics["confusion_2x2"]["value"],
                corner=f"true ↓ / at threshold {op['threshold']:.4g} →",
                digits=0,
            ),
        ),
        html.section("Calibration of p(COVID-19)", _calibration(report)),
        html.section(
            "Class activation maps (COVID-19)",
            html.paragraph("Most confidently correct scans, by the decision at the threshold:"),
            *(cams["correct"] or [html.paragraph("none")]),
            html.paragraph("Most confidently wrong scans:"),
            *(cams["wrong"] or [html.paragraph("none")]),
        ),
    ]
    return html.page(f"fedct evaluation: {data['name']}", parts)


def _splits_text(data: dict[str, Any]) -> str:
    splits = data["splits"]
    return splits if isinstance(splits, str) else ", ".join(splits)


def _op_text(op: dict[str, Any], source: str) -> str:
    if source == UNTUNED:
        return f"threshold {op['threshold']:g}: {UNTUNED}"
    return (
        f"threshold {op['threshold']:.4g} ({op['rule']}), chosen on {op['chosen_on']}; "
        f"from {source}"
    )


def _roc(report: dict[str, Any]) -> str:
    roc = report["curves"]["roc"]
    if roc is None:
        return html.paragraph("No ROC curve: the data lacks COVID-19 or other scans.")
    metrics = report["metrics"]
    point = (
        None if metrics["spec_covid"]["value"] is None else 1.0 - metrics["spec_covid"]["value"],
        metrics["sens_covid"]["value"],
        f"threshold {report['operating_point']['threshold']:.3g}",
    )
    band = roc["band"]
    return html.roc_chart(
        roc["fpr"],
        roc["tpr"],
        title=f"AUC {ci_text(metrics['auc_covid'])}",
        band=(band["fpr"], band["tpr_low"], band["tpr_high"]),
        point=point,
    )


def _per_class(report: dict[str, Any]) -> str:
    confusion = np.array(report["metrics"]["confusion_3x3"]["value"], dtype=float)
    rows = []
    for k, name in enumerate(GLOBAL_CLASSES):
        truth, predicted = confusion[k].sum(), confusion[:, k].sum()
        rows.append(
            [
                name,
                report["data"]["scans_per_class"][name],
                report["patients_per_class"][name],
                ci_text(report["metrics"].get(f"auc_ovr_{name}")),
                confusion[k, k] / truth if truth else None,
                confusion[k, k] / predicted if predicted else None,
            ]
        )
    return html.table(
        [
            "class",
            "scans",
            "patients (by most severe scan)",
            "AUC one-vs-rest",
            "recall (argmax)",
            "precision (argmax)",
        ],
        rows,
    )


def _calibration(report: dict[str, Any]) -> str:
    bins = report["curves"]["calibration"]
    return html.reliability_chart(
        bins["mean_predicted"],
        bins["fraction_covid"],
        bins["count"],
        title="Reliability of p(COVID-19), 10 equal-width bins",
        x_label="mean predicted p(COVID-19)",
        y_label="fraction COVID-19",
    )
