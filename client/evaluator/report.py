"""The self-contained ``report.html`` of ``fedct evaluate``: what was scored and by what, the
ROC with its CI band and the operating point, metrics under readable names with their CIs,
sensitivity by MosMedData severity, per class, both confusion matrices and why they differ,
calibration (the temperature applied, ECE, Brier score, reliability diagrams before and after
the temperature, bins), and evidence maps beside their plain slices, the lungs outlined, on
one scale with its colour bar."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedct.common import html_page
from fedct.common.classes import GLOBAL_CLASSES
from fedct.common.model.cam import EVIDENCE_SCALE, colour_bar

UNTUNED = "fixed 0.5, not tuned"
# What each metric key of common/metrics/classification.py means, as a reader of the report says it.
METRIC_NAMES = {
    "auc_covid": "AUC, COVID-19 vs rest",
    "auc_ovr_normal": "AUC one-vs-rest, normal",
    "auc_ovr_pneumonia_or_abnormal": "AUC one-vs-rest, pneumonia or abnormal",
    "auc_ovr_covid19": "AUC one-vs-rest, COVID-19 (= AUC, COVID-19 vs rest)",
    "sens_covid": "sensitivity for COVID-19 (at the threshold)",
    "spec_covid": "specificity for COVID-19 (at the threshold)",
    "ppv_covid": "positive predictive value (precision)",
    "npv_covid": "negative predictive value",
    "f1_covid": "F1, COVID-19 vs rest",
    "kappa_covid": "Cohen's κ, COVID-19 vs rest",
    "accuracy": "accuracy, 3 classes (argmax)",
    "macro_f1": "macro F1, 3 classes (argmax)",
    "kappa": "Cohen's κ, 3 classes (argmax)",
}
ZERO_WIDTH = "‡"


def ci_text(entry: dict[str, Any] | None) -> str:
    if entry is None or entry["value"] is None:
        return html_page.ABSENT
    low, high = entry["ci"]
    interval = "" if low is None else f" (95% CI {low:.3f}–{high:.3f})"
    return f"{entry['value']:.3f}{interval}"


def _software(versions: dict[str, str] | None) -> str | None:
    return ", ".join(f"{k} {v}" for k, v in (versions or {}).items()) or None


def render_report(report: dict[str, Any], cams: dict[str, list[str]]) -> str:
    op = report["operating_point"]
    data = report["data"]
    model = report["model"]
    run = model.get("run") or {}
    overview = [
        ["model card", f"{model['card']} (round {model['round']})"],
        ["run", run_text(run)],
        ["weights sha256", model["sha256"]],
        ["trained with", _software(model.get("software")) or "not recorded in the card"],
        ["evaluated with", _software(report.get("software"))],
        ["scored by", f"{report['engine']} on {report['device']}"],
        ["data", f"{data['name']} ({data['kind']}, splits: {_splits_text(data)})"],
        ["scans / patients", f"{report['n_scans']} / {report['n_patients']}"],
        ["operating point", _op_text(op, report["operating_point_source"])],
    ]
    parts = [
        html_page.facts(overview),
        *(html_page.paragraph(note, warning=True) for note in report["notes"]),
        html_page.section("ROC curve: COVID-19 vs rest", _roc(report)),
        html_page.section("Metrics with patient-bootstrap 95% CIs", *_metrics_table(report)),
        html_page.section("Sensitivity by severity (MosMedData CT-0 to CT-4)", _severity(report)),
        html_page.section("Per class", _per_class(report)),
        html_page.section("Confusion matrices", *_confusion(report)),
        html_page.section("Calibration of p(COVID-19)", *_calibration(report)),
        html_page.section(
            "Evidence for COVID-19",
            html_page.paragraph(
                "Each scan's slice with the most evidence, plain (as the model sees it) and "
                "with its evidence map: where the model finds evidence for COVID-19 against "
                "the other classes (gradient × activation at the backbone's stride-16 stage, "
                "docs/model.md), in the calibrated logit's units per pixel on one fixed scale "
                "for every scan, so weak evidence looks weak; the slice stays plain where "
                "there is little. Cyan line: the lungs' outline (the cache's lung mask)."
            ),
            *_colour_scale(cams),
            html_page.paragraph(
                "Most confidently correct scans, by the decision at the threshold:"
            ),
            *(cams["correct"] or [html_page.paragraph("none")]),
            html_page.paragraph("Most confidently wrong scans:"),
            *(cams["wrong"] or [html_page.paragraph("none")]),
        ),
    ]
    return html_page.page(f"fedct evaluation: {data['name']}", parts)


def _colour_scale(cams: dict[str, list[str]]) -> list[str]:
    """The CAM colour bar, when the page shows a CAM."""
    if not (cams["correct"] or cams["wrong"]):
        return []
    picture = colour_bar()
    bar = html_page.png_img(
        picture, "evidence colour scale", max_side=512, style=f"width:{picture.shape[1]}px"
    )
    return [
        html_page.figure(
            bar,
            f"colour scale: evidence for COVID-19 per pixel, 0 to {EVIDENCE_SCALE:g} and above "
            f"(a region of 1 % of the scan's pixels at {EVIDENCE_SCALE:g} adds "
            f"{EVIDENCE_SCALE / 100:g} to the log-odds of COVID-19 against the other classes)",
        )
    ]


def run_text(run: dict[str, Any] | None) -> str:
    """The run a model card names (its ``run`` object), in words."""
    if not run:
        return "not recorded in the card"
    return f"run key {run.get('run_key')}, Flower run id {run.get('flower_run_id')}"


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
        return html_page.paragraph("No ROC curve: the data lacks COVID-19 or other scans.")
    metrics = report["metrics"]
    point = (
        None if metrics["spec_covid"]["value"] is None else 1.0 - metrics["spec_covid"]["value"],
        metrics["sens_covid"]["value"],
        f"threshold {report['operating_point']['threshold']:.3g}",
    )
    band = roc["band"]
    return html_page.roc_chart(
        roc["fpr"],
        roc["tpr"],
        title=f"AUC {ci_text(metrics['auc_covid'])}",
        band=(band["fpr"], band["tpr_low"], band["tpr_high"]),
        point=point,
    )


def _metrics_table(report: dict[str, Any]) -> list[str]:
    """Readable names, value and CI; a zero-width CI is marked and explained, not shown as
    if it were certainty."""
    rows, zero_width = [], False
    for key, entry in report["metrics"].items():
        if isinstance(entry["value"], list):
            continue
        low, high = entry["ci"]
        flat = entry["value"] is not None and low is not None and low == high
        zero_width |= flat
        ci = None if low is None else f"{low:.3f}–{high:.3f}" + (f" {ZERO_WIDTH}" if flat else "")
        value = None if entry["value"] is None else round(entry["value"], 3)
        rows.append([METRIC_NAMES.get(key, key), key, value, ci, entry["n_valid"]])
    parts = [html_page.table(["metric", "key", "value", "95% CI", "resamples"], rows)]
    if zero_width:
        parts.append(
            html_page.paragraph(
                f"{ZERO_WIDTH} zero width: every bootstrap resample gave the same value (e.g. "
                "every COVID-19 scan was called COVID-19, or none was). It is no certainty: "
                "with n scans of a class, a rate measured as 0 or 1 can still be off by "
                "about 3/n (rule of three); see the Wilson intervals by severity below."
            )
        )
    return parts


def _severity(report: dict[str, Any]) -> str:
    groups = report.get("by_severity") or []
    if not groups:
        return html_page.paragraph("The data has no severity grades (MosMedData CT-0 to CT-4).")
    rows = []
    for group in groups:
        low, high = group["ci"]
        normal = group["severity"] == "CT-0"
        rows.append(
            [
                group["severity"],
                group["scans"],
                group["called_covid19"],
                "1 − specificity" if normal else "sensitivity",
                round(group["share_called"], 3),
                None if low is None else f"{low:.3f}–{high:.3f}",
            ]
        )
    return html_page.paragraph(
        "Scans of each grade called COVID-19 at the threshold. CT-0 are normal scans, so their "
        "share is the false-positive rate; CT-1 (< 25 % of the lung) to CT-4 (> 75 %) are "
        "COVID-19, so their share is the sensitivity at that grade. Intervals: Wilson 95%."
    ) + html_page.table(
        ["severity", "scans", "called COVID-19", "share is", "share", "95% CI (Wilson)"], rows
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
    return html_page.table(
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


def _confusion(report: dict[str, Any]) -> list[str]:
    metrics, op = report["metrics"], report["operating_point"]
    differ = report.get("decisions_differ")
    why = (
        "The two matrices decide differently. The 3 × 3 matrix takes the class with the "
        "highest probability (argmax); the 2 × 2 matrix calls a scan COVID-19 when "
        f"p(COVID-19) ≥ {op['threshold']:.4g}, the operating point chosen on other data. "
        "A scan can have its highest probability on another class and still reach the "
        "threshold, or the other way round"
    )
    if differ is not None:
        why += f": here {differ} of {report['n_scans']} scans are decided differently."
    return [
        html_page.paragraph(why),
        html_page.heatmap_table(
            GLOBAL_CLASSES,
            GLOBAL_CLASSES,
            metrics["confusion_3x3"]["value"],
            corner="true ↓ / predicted (argmax) →",
            digits=0,
        ),
        html_page.heatmap_table(
            ["other", "covid19"],
            ["called other", "called covid19"],
            metrics["confusion_2x2"]["value"],
            corner=f"true ↓ / at threshold {op['threshold']:.4g} →",
            digits=0,
        ),
    ]


def _calibration(report: dict[str, Any]) -> list[str]:
    curves = report["curves"]
    scores = report.get("calibration") or {}
    temperature = scores.get("temperature", 1.0)
    before = curves.get("calibration_before")
    charts = [_reliability(curves["calibration"], "with" if before else None, temperature)]
    if before:
        charts.insert(0, _reliability(before, "without", 1.0))
    facts = [
        ["temperature applied", f"{temperature:.3g} ({scores.get('temperature_source')})"],
        ["expected calibration error (ECE)", _rounded(scores.get("ece"))],
        ["ECE of perfect calibration on these scans", _floor_text(scores.get("ece_noise_floor"))],
        ["Brier score (COVID-19 vs rest)", _rounded(scores.get("brier"))],
    ]
    if scores.get("before"):
        facts += [
            ["ECE without the temperature", _rounded(scores["before"].get("ece"))],
            ["Brier score without it", _rounded(scores["before"].get("brier"))],
        ]
    note = html_page.paragraph(
        "Every probability of this report is calibrated: the model's logits divided by the "
        "temperature of its card before the softmax (docs/evaluation.md), and the threshold "
        "applies to these probabilities. ECE: the gap between the fraction of COVID-19 scans "
        "and the mean predicted p(COVID-19) in each bin, weighted by the bin's scans (0 is "
        "perfect). Brier score: the mean squared difference between p(COVID-19) and the "
        "truth (0 is perfect; 0.25 is what p = 0.5 for every scan gives). With few scans per "
        "bin both are rough."
    )
    bins = curves["calibration"]
    edges = bins["edges"]
    rows = [
        [
            f"{edges[i]:.1f}–{edges[i + 1]:.1f}",
            bins["count"][i],
            None if bins["mean_predicted"][i] is None else round(bins["mean_predicted"][i], 3),
            None if bins["fraction_covid"][i] is None else round(bins["fraction_covid"][i], 3),
        ]
        for i in range(len(bins["count"]))
    ]
    return [
        '<div class="charts">' + "".join(charts) + "</div>",
        html_page.facts(facts),
        note,
        html_page.table(["p(COVID-19) bin", "scans", "mean predicted", "fraction COVID-19"], rows),
    ]


def _reliability(bins: dict[str, Any], temperature_is: str | None, temperature: float) -> str:
    title = "Reliability of p(COVID-19), 10 equal-width bins"
    if temperature_is == "with":
        title += f", temperature {temperature:.3g}"
    elif temperature_is == "without":
        title += ", without the temperature"
    return html_page.reliability_chart(
        bins["mean_predicted"],
        bins["fraction_covid"],
        bins["count"],
        title=title,
        x_label="mean predicted p(COVID-19)",
        y_label="fraction COVID-19",
    )


def _floor_text(floor: dict[str, Any] | None) -> str | None:
    """The ECE that perfectly calibrated probabilities show on the reported scans."""
    if not floor or floor.get("median") is None:
        return None
    return (
        f"{floor['median']:.3f} (90 % of draws {floor['p5']:.3f}–{floor['p95']:.3f}): labels "
        "drawn from the probabilities themselves; an ECE near it is all these scans can show"
    )


def _rounded(value: Any) -> float | None:
    return None if value is None else round(float(value), 3)
