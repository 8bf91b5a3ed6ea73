"""Metrics, operating points and the patient bootstrap, checked against scikit-learn."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from fedct.common.classes import COVID_INDEX, GLOBAL_CLASSES
from fedct.common.metrics.bootstrap import full_report, patient_strata, roc_band, scan_weight_chunks
from fedct.common.metrics.calibration import calibration_bins
from fedct.common.metrics.classification import (
    SUMMARY_KEYS,
    roc_curve_points,
    summarize,
    weighted_metrics,
)
from fedct.common.metrics.operating_point import OperatingPoint, choose_operating_point

FAST = settings(max_examples=60, deadline=None)


@st.composite
def predictions(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """Labels with COVID-19 and other scans; probabilities on a coarse grid, so ties occur."""
    n = draw(st.integers(4, 40))
    labels = np.array(draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)))
    labels[0], labels[1] = COVID_INDEX, draw(st.integers(0, 1))
    cells = draw(st.lists(st.integers(0, 6), min_size=3 * n, max_size=3 * n))
    raw = np.array(cells, dtype=float).reshape(n, 3) + 0.5
    return labels, raw / raw.sum(axis=1, keepdims=True)


def probs_for(labels: np.ndarray, seed: int, separation: float = 1.5) -> np.ndarray:
    """Softmax probabilities that favour each scan's true class by ``separation`` logits."""
    logits = np.random.default_rng(seed).normal(size=(labels.size, 3))
    logits[np.arange(labels.size), labels] += separation
    probs = np.exp(logits)
    return probs / probs.sum(axis=1, keepdims=True)


def synthetic(n: int, seed: int, separation: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """n random labels and probabilities from probs_for."""
    labels = np.random.default_rng(seed + 1000).integers(0, 3, n)
    return labels, probs_for(labels, seed, separation)


def point_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict:
    return {
        key: value[0]
        for key, value in weighted_metrics(
            labels, probs, threshold, np.ones((1, labels.size))
        ).items()
    }


def sklearn_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict:
    covid = (labels == COVID_INDEX).astype(int)
    called = (probs[:, COVID_INDEX] >= threshold).astype(int)
    predicted = probs.argmax(axis=1)
    expected = {
        "auc_covid": roc_auc_score(covid, probs[:, COVID_INDEX]),
        "sens_covid": recall_score(covid, called, zero_division=np.nan),
        "spec_covid": recall_score(covid, called, pos_label=0, zero_division=np.nan),
        "ppv_covid": precision_score(covid, called, zero_division=np.nan),
        "npv_covid": precision_score(covid, called, pos_label=0, zero_division=np.nan),
        "f1_covid": f1_score(covid, called, zero_division=0),
        "kappa_covid": cohen_kappa_score(covid, called),
        "accuracy": accuracy_score(labels, predicted),
        "macro_f1": f1_score(labels, predicted, average="macro", zero_division=0),
        "kappa": cohen_kappa_score(labels, predicted),
        "confusion_3x3": confusion_matrix(labels, predicted, labels=[0, 1, 2]),
        "confusion_2x2": confusion_matrix(covid, called, labels=[0, 1]),
    }
    for k in np.unique(labels):
        expected[f"auc_ovr_{GLOBAL_CLASSES[k]}"] = roc_auc_score(labels == k, probs[:, k])
    return expected


def assert_same(ours: dict, expected: dict) -> None:
    for key, value in expected.items():
        np.testing.assert_allclose(ours[key], value, rtol=1e-10, atol=1e-12, err_msg=key)


@FAST
@given(predictions(), st.sampled_from([0.2, 0.35, 0.5, 0.7]))
def test_every_metric_equals_sklearn(data: tuple, threshold: float) -> None:
    labels, probs = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about classes absent from predictions
        expected = sklearn_metrics(labels, probs, threshold)
    assert_same(point_metrics(labels, probs, threshold), expected)


@FAST
@given(predictions(), st.integers(0, 2**32 - 1))
def test_integer_weights_equal_repeated_scans(data: tuple, seed: int) -> None:
    labels, probs = data
    weights = np.random.default_rng(seed).integers(0, 4, size=(3, labels.size))
    weights[:, :2] += 1  # keep a COVID-19 and another scan in every row
    batched = weighted_metrics(labels, probs, 0.4, weights.astype(float))
    for row, repeats in enumerate(weights):
        index = np.repeat(np.arange(labels.size), repeats)
        expected = point_metrics(labels[index], probs[index], 0.4)
        assert_same({key: value[row] for key, value in batched.items()}, expected)


def test_hand_made_example() -> None:
    labels = np.array([0, 0, 2, 2, 1])
    covid = np.array([0.1, 0.4, 0.35, 0.8, 0.2])
    probs = np.column_stack([1 - covid - 0.05, np.full(5, 0.05), covid])
    probs[4] = [0.1, 0.7, 0.2]
    metrics = point_metrics(labels, probs, 0.38)
    # COVID pairs (0.35, 0.8) against others (0.1, 0.4, 0.2): 5 of 6 pairs ranked right.
    assert metrics["auc_covid"] == pytest.approx(5 / 6)
    # Called COVID: 0.4 (false positive) and 0.8 (true positive).
    assert metrics["sens_covid"] == 0.5 and metrics["spec_covid"] == pytest.approx(2 / 3)
    assert metrics["ppv_covid"] == 0.5 and metrics["npv_covid"] == pytest.approx(2 / 3)
    # Binary kappa: observed 3/5, expected (3*3 + 2*2)/25 = 13/25.
    assert metrics["kappa_covid"] == pytest.approx((3 / 5 - 13 / 25) / (1 - 13 / 25))
    # Argmax: normal, normal, normal, covid, pneumonia.
    assert metrics["accuracy"] == pytest.approx(4 / 5)
    np.testing.assert_array_equal(metrics["confusion_3x3"], [[2, 0, 0], [0, 1, 0], [1, 0, 1]])


def test_summarize_keys_and_values() -> None:
    labels, probs = synthetic(60, seed=3)
    summary = summarize(labels, probs, threshold=0.4)
    assert tuple(summary) == SUMMARY_KEYS
    assert all(type(value) is float for value in summary.values())
    expected = sklearn_metrics(labels, probs, 0.4)
    assert_same(summary, {key: expected[key] for key in SUMMARY_KEYS if key != "n"})
    assert summary["n"] == 60.0


@pytest.mark.parametrize("only", [0, 1, 2])
def test_summarize_one_class_gives_nan_auc_without_raising(only: int) -> None:
    _, probs = synthetic(8, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = summarize(np.full(8, only), probs)
    assert math.isnan(summary["auc_covid"])
    assert math.isnan(summary["sens_covid"]) != (only == COVID_INDEX)
    assert not math.isnan(summary["accuracy"])


def test_summarize_binary_external_set() -> None:
    labels, probs = synthetic(40, seed=5)
    labels = np.where(labels == 1, 0, labels)  # MosMedData: normal vs COVID-19 only
    summary = summarize(labels, probs)
    assert summary["auc_covid"] == pytest.approx(roc_auc_score(labels == 2, probs[:, 2]))


def test_bad_inputs_are_rejected() -> None:
    _, probs = synthetic(5, seed=6)
    with pytest.raises(ValueError, match="shape"):
        summarize(np.zeros(4, dtype=int), probs)
    with pytest.raises(ValueError, match="0..2"):
        summarize(np.array([0, 1, 2, 3, 0]), probs)
    with pytest.raises(ValueError, match="shape"):
        summarize(np.zeros(5, dtype=int), probs[:, :2])


def brute_force_rates(labels: np.ndarray, probs: np.ndarray) -> list[tuple[float, float, float]]:
    """(threshold, sensitivity, specificity) at every distinct score and above the maximum."""
    scores, positive = probs[:, COVID_INDEX], labels == COVID_INDEX
    candidates = [*np.unique(scores), np.nextafter(scores.max(), np.inf)]
    return [(t, (scores[positive] >= t).mean(), (scores[~positive] < t).mean()) for t in candidates]


@FAST
@given(predictions(), st.sampled_from([0.5, 0.8, 0.95]))
def test_sens_at_spec_is_the_most_sensitive_threshold_meeting_the_floor(
    data: tuple, floor: float
) -> None:
    labels, probs = data
    point = choose_operating_point(labels, probs, min_specificity=floor)
    called = point.predict_covid(probs)
    positive = labels == COVID_INDEX
    assert point.specificity == pytest.approx((~called[~positive]).mean())
    assert point.sensitivity == pytest.approx(called[positive].mean())
    assert point.specificity >= floor - 1e-12
    best = max(sens for _, sens, spec in brute_force_rates(labels, probs) if spec >= floor - 1e-12)
    assert point.sensitivity == pytest.approx(best)


@FAST
@given(predictions())
def test_youden_maximises_j(data: tuple) -> None:
    labels, probs = data
    point = choose_operating_point(labels, probs, "youden")
    best = max(sens + spec - 1 for _, sens, spec in brute_force_rates(labels, probs))
    assert point.sensitivity + point.specificity - 1 == pytest.approx(best)
    assert point.min_specificity is None


def test_spec_floor_met_exactly_at_nineteen_of_twenty() -> None:
    labels = np.r_[np.zeros(20, dtype=int), np.full(4, COVID_INDEX)]
    covid = np.r_[np.linspace(0.0, 0.5, 19), 0.9, [0.6, 0.7, 0.8, 0.95]]
    probs = np.column_stack([1 - covid, np.zeros(24), covid])
    point = choose_operating_point(labels, probs, min_specificity=0.95)
    assert (point.threshold, point.sensitivity, point.specificity) == (0.6, 1.0, 0.95)


def test_fixed_rule_records_the_given_threshold() -> None:
    labels, probs = synthetic(50, seed=7)
    point = choose_operating_point(labels, probs, "fixed", threshold=0.3, chosen_on="tune A")
    assert (point.threshold, point.rule, point.chosen_on) == (0.3, "fixed", "tune A")
    assert point.sensitivity == pytest.approx(summarize(labels, probs, threshold=0.3)["sens_covid"])


@pytest.mark.parametrize("rule", ["sens_at_spec", "youden", "fixed"])
def test_one_class_tuning_data_is_a_clear_error(rule: str) -> None:
    _, probs = synthetic(10, seed=8)
    with pytest.raises(ValueError, match="0 COVID-19 and 10 other scans"):
        choose_operating_point(np.zeros(10, dtype=int), probs, rule, chosen_on="tune B")
    with pytest.raises(ValueError, match="unknown operating-point rule"):
        choose_operating_point(np.zeros(10, dtype=int), probs, "best")


def test_operating_point_round_trips_through_json() -> None:
    labels, probs = synthetic(80, seed=9)
    point = choose_operating_point(labels, probs, chosen_on="tune split of site A, 80 scans")
    assert OperatingPoint.from_dict(json.loads(json.dumps(point.to_dict()))) == point
    with pytest.raises(ValueError, match="lacks threshold"):
        OperatingPoint.from_dict({k: v for k, v in point.to_dict().items() if k != "threshold"})
    with pytest.raises(ValueError, match="unknown fields"):
        OperatingPoint.from_dict({**point.to_dict(), "auc": 0.9})


def test_report_applies_the_stored_threshold() -> None:
    tune_labels, tune_probs = synthetic(100, seed=10)
    test_labels, test_probs = synthetic(100, seed=11, separation=0.5)
    stored = choose_operating_point(tune_labels, tune_probs)
    rechosen = choose_operating_point(test_labels, test_probs)
    assert stored.threshold != rechosen.threshold
    report = full_report(test_labels, test_probs, [str(i) for i in range(100)], stored, n_boot=50)
    expected = summarize(test_labels, test_probs, threshold=stored.threshold)
    assert report["metrics"]["sens_covid"]["value"] == pytest.approx(expected["sens_covid"])
    assert report["metrics"]["spec_covid"]["value"] == pytest.approx(expected["spec_covid"])
    assert report["operating_point"] == stored.to_dict()


def grouped_cohort(seed: int = 12) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """120 scans of 40 patients, three scans each; a patient's scans share a label."""
    labels = np.repeat(np.random.default_rng(seed).integers(0, 3, 40), 3)
    return (
        labels,
        probs_for(labels, seed, separation=1.0),
        [f"patient-{i // 3:02d}" for i in range(120)],
    )


def test_report_is_json_ready_and_ci_contains_the_estimate() -> None:
    labels, probs, patients = grouped_cohort()
    point = OperatingPoint(0.4, "fixed", "test fixture", 0.8, 0.9)
    report = full_report(labels, probs, patients, point, n_boot=300)
    json.dumps(report, allow_nan=False)
    assert report["n_patients"] == 40 and report["n_scans"] == 120
    for name, entry in report["metrics"].items():
        low, high = entry["ci"]
        assert entry["n_valid"] == 300, name
        assert np.all(np.asarray(low) <= np.asarray(entry["value"])), name
        assert np.all(np.asarray(entry["value"]) <= np.asarray(high)), name


def test_report_skips_absent_classes_and_undefined_resamples() -> None:
    labels, probs, patients = grouped_cohort(seed=13)
    labels = np.where(labels == 1, 0, labels)
    point = OperatingPoint(0.5, "fixed", "test fixture", 0.8, 0.9)
    metrics = full_report(labels, probs, patients, point, n_boot=100)["metrics"]
    assert "auc_ovr_pneumonia_or_abnormal" not in metrics and "auc_ovr_normal" in metrics
    # No scan is called COVID-19 at 1.0, so PPV is undefined in every resample.
    never = OperatingPoint(1.0, "fixed", "test fixture", 0.0, 1.0)
    ppv = full_report(labels, probs, patients, never, n_boot=100)["metrics"]["ppv_covid"]
    assert ppv == {"value": None, "ci": [None, None], "n_valid": 0}


def test_bootstrap_is_reproducible_by_seed() -> None:
    labels, probs, patients = grouped_cohort()
    point = OperatingPoint(0.4, "fixed", "test fixture", 0.8, 0.9)
    first, again, other = (
        full_report(labels, probs, patients, point, n_boot=200, seed=seed)["metrics"]
        for seed in (1, 1, 2)
    )
    assert first == again
    assert first["auc_covid"]["ci"] != other["auc_covid"]["ci"]


def test_resamples_hold_whole_patients_and_keep_strata_sizes() -> None:
    labels, _, patients = grouped_cohort()
    labels[0] = 0  # patient-0 now mixes classes; its most severe scan sets its stratum
    scan_patient, patient_class = patient_strata(labels, patients)
    assert patient_class[scan_patient[0]] == labels[1:3].max()
    for weights in scan_weight_chunks(scan_patient, patient_class, 600, seed=0):
        assert weights.shape == (250, 120) or weights.shape == (100, 120)
        by_patient = weights.reshape(-1, 40, 3)  # scans of a patient are consecutive
        assert np.all(by_patient == by_patient[:, :, :1]), "a patient's scans drawn apart"
        for stratum in np.unique(patient_class):
            drawn = by_patient[:, patient_class == stratum, 0].sum(axis=1)
            assert np.all(drawn == (patient_class == stratum).sum())


def test_patient_bootstrap_differs_from_scan_bootstrap() -> None:
    # Every patient has five identical scans: resampling patients must give exactly the CI of
    # the one-scan-per-patient data, while treating scans as independent narrows it.
    labels, probs = synthetic(30, seed=14, separation=0.8)
    repeated = np.repeat(np.arange(30), 5)
    patients = [f"p{i}" for i in range(30)]
    point = OperatingPoint(0.4, "fixed", "test fixture", 0.8, 0.9)

    def auc_ci(ids: list[str], index: np.ndarray) -> list[float]:
        report = full_report(labels[index], probs[index], ids, point, n_boot=400)
        return report["metrics"]["auc_covid"]["ci"]

    by_patient = auc_ci([patients[i] for i in repeated], repeated)
    one_scan_each = auc_ci(patients, np.arange(30))
    by_scan = auc_ci([str(i) for i in range(150)], repeated)
    assert by_patient == pytest.approx(one_scan_each)
    assert by_scan[1] - by_scan[0] < 0.7 * (by_patient[1] - by_patient[0])


def test_roc_points_band_and_calibration() -> None:
    labels, probs, patients = grouped_cohort()
    fpr, tpr, _ = roc_curve_points(labels, probs)
    assert np.trapezoid(tpr, fpr) == pytest.approx(summarize(labels, probs)["auc_covid"])
    band = roc_band(labels, probs, patients, n_boot=200)
    assert band["fpr"].shape == band["tpr"].shape == band["tpr_low"].shape == (101,)
    assert np.all(np.diff(band["tpr"]) >= 0) and band["tpr"][-1] == 1.0
    assert np.all(band["tpr_low"] <= band["tpr_high"]) and band["n_valid"] == 200
    bins = calibration_bins(labels, probs, n_bins=5)
    observed, predicted = calibration_curve(labels == COVID_INDEX, probs[:, COVID_INDEX], n_bins=5)
    filled = bins["count"] > 0
    np.testing.assert_allclose(bins["fraction_covid"][filled], observed)
    np.testing.assert_allclose(bins["mean_predicted"][filled], predicted)
    assert bins["count"].sum() == labels.size
