"""Patient-level stratified bootstrap: 95% confidence intervals and the full test report.

Scans of one patient are strongly correlated, so the unit of resampling is the patient: each
resample draws, within every patient class, as many patients as that class has, with
replacement, and takes all scans of each drawn patient.  A patient's class is the label of
their most severe scan (covid19 > pneumonia_or_abnormal > normal).  A resample is represented
by scan weights (how often the scan's patient was drawn), so all resamples are evaluated at
once by common/metrics/classification.py.  Intervals are percentile intervals over the
resamples in which a metric is defined.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from fedct.common.classes import COVID_INDEX, GLOBAL_CLASSES
from fedct.common.metrics.classification import (
    check_inputs,
    weighted_auc,
    weighted_metrics,
    weighted_roc,
)
from fedct.common.metrics.operating_point import OperatingPoint

PATIENT_CLASS_RULE = "most severe scan: covid19 > pneumonia_or_abnormal > normal"
# Resamples evaluated together; bounds memory at about _CHUNK x N floats per array.
_CHUNK = 250


def patient_strata(labels: np.ndarray, patient_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each scan's patient index (N,) and each patient's class (P,), see PATIENT_CLASS_RULE."""
    ids = np.asarray(patient_ids, dtype=str)
    if ids.shape != np.shape(labels):
        raise ValueError(f"need one patient id per scan: {ids.size} ids for {len(labels)} scans")
    _, scan_patient = np.unique(ids, return_inverse=True)
    patient_class = np.zeros(scan_patient.max(initial=-1) + 1, dtype=np.int64)
    # GLOBAL_CLASSES is ordered by severity, so the most severe label is the largest index.
    np.maximum.at(patient_class, scan_patient, labels)
    return scan_patient, patient_class


def resample_counts(patient_class: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, P) times each patient is drawn; per class as many draws as patients."""
    counts = np.zeros((n_boot, patient_class.size), dtype=np.int64)
    for stratum in np.unique(patient_class):
        members = np.flatnonzero(patient_class == stratum)
        uniform = np.full(members.size, 1.0 / members.size)
        counts[:, members] = rng.multinomial(members.size, uniform, size=n_boot)
    return counts


def scan_weight_chunks(
    scan_patient: np.ndarray, patient_class: np.ndarray, n_boot: int, seed: int
) -> Iterator[np.ndarray]:
    """Scan weights (resamples, N) of n_boot seeded resamples, in chunks of at most _CHUNK."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    counts = resample_counts(patient_class, n_boot, np.random.default_rng(seed))
    for start in range(0, n_boot, _CHUNK):
        yield counts[start : start + _CHUNK][:, scan_patient].astype(float)


def _plain(x: Any) -> Any:
    """Floats or nested lists of floats, NaN as None: ready for json.dumps."""
    values = np.asarray(x, dtype=float)
    if values.ndim == 0:
        return None if np.isnan(values) else float(values)
    return [_plain(v) for v in values]


def _interval(value: np.ndarray, samples: np.ndarray, ci: float) -> dict[str, Any]:
    valid = ~np.isnan(samples.reshape(samples.shape[0], -1)).any(axis=1)
    if valid.any():
        low, high = np.percentile(samples[valid], [50 * (1 - ci), 50 * (1 + ci)], axis=0)
    else:
        low = high = np.full(value.shape, np.nan)
    return {"value": _plain(value), "ci": [_plain(low), _plain(high)], "n_valid": int(valid.sum())}


def full_report(
    labels: np.ndarray,
    probs: np.ndarray,
    patient_ids: Sequence[str],
    operating_point: OperatingPoint,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Every metric with its patient-level bootstrap CI, JSON-ready.

    ``operating_point`` must have been chosen on other (tuning) data; its threshold is
    applied unchanged.  ``metrics`` maps each name of
    fedct.common.metrics.classification.weighted_metrics (per-class AUCs only for classes
    present) to ``{"value", "ci": [low, high], "n_valid"}``; confusion matrices get
    element-wise intervals.  Undefined values are None.
    """
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie strictly between 0 and 1, got {ci}")
    labels, probs = check_inputs(labels, probs)
    scan_patient, patient_class = patient_strata(labels, patient_ids)
    chunks = scan_weight_chunks(scan_patient, patient_class, n_boot, seed)
    threshold = operating_point.threshold
    point = weighted_metrics(labels, probs, threshold, np.ones((1, labels.size)))
    parts = [weighted_metrics(labels, probs, threshold, weights) for weights in chunks]
    present = [name for k, name in enumerate(GLOBAL_CLASSES) if (labels == k).any()]
    absent_auc = {f"auc_ovr_{name}" for name in GLOBAL_CLASSES if name not in present}
    return {
        "n_scans": int(labels.size),
        "n_patients": int(patient_class.size),
        "patients_per_class": {
            name: int((patient_class == k).sum()) for k, name in enumerate(GLOBAL_CLASSES)
        },
        "classes_present": present,
        "patient_class_rule": PATIENT_CLASS_RULE,
        "bootstrap": {"n_boot": n_boot, "seed": seed, "ci": ci, "method": "percentile"},
        "operating_point": operating_point.to_dict(),
        "metrics": {
            key: _interval(values[0], np.concatenate([p[key] for p in parts]), ci)
            for key, values in point.items()
            if key not in absent_auc
        },
    }


def auc_interval(
    labels: np.ndarray,
    probs: np.ndarray,
    patient_ids: Sequence[str],
    *,
    n_boot: int = 200,
    seed: int = 0,
    ci: float = 0.95,
) -> tuple[float, float]:
    """The patient-level bootstrap CI of the COVID-19 AUC alone (cheap enough for every
    federated evaluation); NaN bounds when the AUC is undefined."""
    labels, probs = check_inputs(labels, probs)
    positive = labels == COVID_INDEX
    if positive.all() or not positive.any():
        return math.nan, math.nan
    scan_patient, patient_class = patient_strata(labels, patient_ids)
    scores = probs[:, COVID_INDEX]
    samples = np.concatenate(
        [
            weighted_auc(positive, scores, weights)
            for weights in scan_weight_chunks(scan_patient, patient_class, n_boot, seed)
        ]
    )
    samples = samples[~np.isnan(samples)]
    if not samples.size:
        return math.nan, math.nan
    low, high = np.percentile(samples, [50 * (1 - ci), 50 * (1 + ci)])
    return float(low), float(high)


def _tpr_on_grid(
    positive: np.ndarray, scores: np.ndarray, weights: np.ndarray, grid: np.ndarray
) -> np.ndarray:
    """Per weight row with negatives, the highest tpr reachable with fpr <= each grid value."""
    fpr, tpr, _ = weighted_roc(positive, scores, weights)
    defined = ~np.isnan(fpr[:, -1])
    index = np.stack([np.searchsorted(row, grid, side="right") - 1 for row in fpr[defined]])
    return np.take_along_axis(tpr[defined], index, axis=1)


def roc_band(
    labels: np.ndarray,
    probs: np.ndarray,
    patient_ids: Sequence[str],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    n_points: int = 101,
) -> dict[str, Any]:
    """COVID-19-vs-rest step ROC curve with a patient-bootstrap band on a fixed fpr grid.

    Returns ``fpr`` (n_points values 0..1), ``tpr`` (observed), ``tpr_low`` and ``tpr_high``
    (percentiles over the resampled curves) and ``n_valid`` (resamples with negatives).  The
    same seed draws the same resamples as full_report.  ValueError when COVID-19 or other
    scans are missing.
    """
    labels, probs = check_inputs(labels, probs)
    positive = labels == COVID_INDEX
    if positive.all() or not positive.any():
        raise ValueError("an ROC curve needs both COVID-19 and other scans")
    scores = probs[:, COVID_INDEX]
    grid = np.linspace(0.0, 1.0, n_points)
    observed = _tpr_on_grid(positive, scores, np.ones((1, labels.size)), grid)
    chunks = scan_weight_chunks(*patient_strata(labels, patient_ids), n_boot, seed)
    curves = np.concatenate([_tpr_on_grid(positive, scores, w, grid) for w in chunks])
    low, high = np.percentile(curves, [50 * (1 - ci), 50 * (1 + ci)], axis=0)
    return {
        "fpr": grid,
        "tpr": observed[0],
        "tpr_low": low,
        "tpr_high": high,
        "n_valid": curves.shape[0],
    }
