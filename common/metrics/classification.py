"""Classification metrics: three global classes, and COVID-19 vs rest at a threshold.

Every metric is computed from *weighted* counts, one row of weights per evaluation: the point
estimate uses a single row of ones, the patient bootstrap (common/metrics/bootstrap.py) one row per
resample holding how often each scan's patient was drawn.  Integer weights give exactly the
metric of the data set with those scans repeated, so one vectorised code path serves both.
Definitions follow scikit-learn; tests/test_metrics.py checks that they agree.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import roc_curve

from fedct.common.classes import COVID_INDEX, GLOBAL_CLASSES

N_CLASSES = len(GLOBAL_CLASSES)
SUMMARY_KEYS = ("auc_covid", "sens_covid", "spec_covid", "accuracy", "n")


def check_inputs(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels as int64 (N,) in 0..2 and probabilities as float (N, 3); ValueError otherwise."""
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2 or probs.shape[1] != N_CLASSES:
        raise ValueError(f"probs must have shape (N, {N_CLASSES}), got {probs.shape}")
    if labels.shape != (probs.shape[0],):
        raise ValueError(f"labels must have shape ({probs.shape[0]},), got {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= N_CLASSES):
        raise ValueError(f"labels must lie in 0..{N_CLASSES - 1}")
    if not np.isfinite(probs).all():
        raise ValueError("probs contain NaN or infinite values")
    return labels.astype(np.int64), probs


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den is 0 (an undefined metric, not an error)."""
    num, den = np.broadcast_arrays(np.asarray(num, dtype=float), np.asarray(den, dtype=float))
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def weighted_roc(
    positive: np.ndarray, scores: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points of each weight row, from the strictest threshold to the most lenient.

    positive (N,) bool, scores (N,), weights (B, N).  Returns fpr and tpr of shape (B, G + 1)
    and the G + 1 thresholds: inf, then the G distinct scores in descending order; a scan is
    called positive at threshold t when its score >= t.  Rows without positive (negative)
    weight have NaN tpr (fpr).  Needs N >= 1.
    """
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    w = weights[:, order]
    pos = positive[order]
    zero = np.zeros((w.shape[0], 1))
    tp = np.hstack([zero, np.cumsum(np.add.reduceat(w * pos, starts, axis=1), axis=1)])
    fp = np.hstack([zero, np.cumsum(np.add.reduceat(w * ~pos, starts, axis=1), axis=1)])
    thresholds = np.r_[np.inf, sorted_scores[starts]]
    return ratio(fp, fp[:, -1:]), ratio(tp, tp[:, -1:]), thresholds


def weighted_auc(positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC (trapezoidal, ties count one half) per weight row; NaN where it is undefined."""
    if positive.all() or not positive.any():
        return np.full(weights.shape[0], np.nan)
    fpr, tpr, _ = weighted_roc(positive, scores, weights)
    return np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2, axis=1)


def weighted_confusion(
    truth: np.ndarray, predicted: np.ndarray, weights: np.ndarray, n_classes: int
) -> np.ndarray:
    """Confusion matrices (B, k, k) indexed [true, predicted], as scikit-learn's."""
    cells = np.zeros((truth.size, n_classes * n_classes))
    cells[np.arange(truth.size), truth * n_classes + predicted] = 1.0
    return (weights @ cells).reshape(-1, n_classes, n_classes)


def kappa(confusion: np.ndarray) -> np.ndarray:
    """Cohen's kappa of each (k, k) confusion matrix in a (B, k, k) stack."""
    total = confusion.sum(axis=(1, 2))
    observed = ratio(np.trace(confusion, axis1=1, axis2=2), total)
    expected = ratio((confusion.sum(axis=2) * confusion.sum(axis=1)).sum(axis=1), total**2)
    return ratio(observed - expected, 1.0 - expected)


def _multiclass_metrics(confusion: np.ndarray) -> dict[str, np.ndarray]:
    hits = np.diagonal(confusion, axis1=1, axis2=2)
    # 2 tp + fp + fn = row sum + column sum; a class absent from both truth and predictions
    # has no F1 and, as in scikit-learn's default, is left out of the macro average.
    per_class_f1 = ratio(2 * hits, confusion.sum(axis=1) + confusion.sum(axis=2))
    present = ~np.isnan(per_class_f1)
    return {
        "accuracy": ratio(hits.sum(axis=1), confusion.sum(axis=(1, 2))),
        "macro_f1": ratio(np.nansum(per_class_f1, axis=1), present.sum(axis=1)),
        "kappa": kappa(confusion),
    }


def _binary_metrics(confusion: np.ndarray) -> dict[str, np.ndarray]:
    tn, fp, fn, tp = (confusion[:, i, j] for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
    return {
        "sens_covid": ratio(tp, tp + fn),
        "spec_covid": ratio(tn, tn + fp),
        "ppv_covid": ratio(tp, tp + fp),
        "npv_covid": ratio(tn, tn + fn),
        "f1_covid": ratio(2 * tp, 2 * tp + fp + fn),
        "kappa_covid": kappa(confusion),
    }


def weighted_metrics(
    labels: np.ndarray, probs: np.ndarray, threshold: float, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """All metrics for each weight row (B, N), on checked inputs (see check_inputs).

    Scalar metrics have shape (B,): ``auc_covid``, ``auc_ovr_<class>`` per global class,
    ``<sens|spec|ppv|npv|f1|kappa>_covid`` (COVID-19 vs rest at score >= threshold),
    ``accuracy``, ``macro_f1`` and ``kappa`` (3-class argmax).  ``confusion_3x3`` (B, 3, 3)
    and ``confusion_2x2`` (B, 2, 2, index 1 = COVID-19) hold weighted counts.
    """
    out: dict[str, np.ndarray] = {
        f"auc_ovr_{name}": weighted_auc(labels == k, probs[:, k], weights)
        for k, name in enumerate(GLOBAL_CLASSES)
    }
    out["auc_covid"] = out[f"auc_ovr_{GLOBAL_CLASSES[COVID_INDEX]}"]
    confusion_3x3 = weighted_confusion(labels, probs.argmax(axis=1), weights, N_CLASSES)
    is_covid = (labels == COVID_INDEX).astype(np.int64)
    called_covid = (probs[:, COVID_INDEX] >= threshold).astype(np.int64)
    confusion_2x2 = weighted_confusion(is_covid, called_covid, weights, 2)
    out.update(_multiclass_metrics(confusion_3x3))
    out.update(_binary_metrics(confusion_2x2))
    out["confusion_3x3"] = confusion_3x3
    out["confusion_2x2"] = confusion_2x2
    return out


def summarize(labels: np.ndarray, probs: np.ndarray, *, threshold: float = 0.5) -> dict[str, float]:
    """Headline metrics as plain floats (for a Flower MetricRecord); never raises on one class.

    Keys: ``auc_covid`` (COVID-19 vs rest ROC AUC), ``sens_covid`` and ``spec_covid``
    (COVID-19 vs rest at ``probs[:, COVID_INDEX] >= threshold``), ``accuracy`` (3-class argmax)
    and ``n`` (scans).  A metric whose denominator class is absent is NaN.  Binary external
    sets (normal vs COVID-19, labels 0 and 2) need no special handling.
    """
    labels, probs = check_inputs(labels, probs)
    metrics = weighted_metrics(labels, probs, threshold, np.ones((1, labels.size)))
    summary = {key: float(metrics[key][0]) for key in SUMMARY_KEYS if key != "n"}
    summary["n"] = float(labels.size)
    return summary


def roc_curve_points(
    labels: np.ndarray, probs: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """COVID-19-vs-rest ROC curve (fpr, tpr, thresholds) from scikit-learn, for plotting."""
    labels, probs = check_inputs(labels, probs)
    fpr, tpr, thresholds = roc_curve(labels == COVID_INDEX, probs[:, COVID_INDEX])
    return fpr, tpr, thresholds


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score 95 % interval of a proportion (NaN for no trials): unlike a
    bootstrap, it has width even at 0 of n or n of n."""
    if trials <= 0:
        return float("nan"), float("nan")
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = (
        z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    )
    return max(0.0, centre - half), min(1.0, centre + half)
