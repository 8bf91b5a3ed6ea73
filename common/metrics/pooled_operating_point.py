"""The COVID-19 operating point chosen from score histograms pooled across sites.

For federated tuning each site reports, for its tune split, how many COVID-19 scans and how
many other scans have a COVID-19 probability in each of ``bins`` equal-width bins on [0, 1]:
counts per bin, never a scan's score.  The coordinator sums the sites' counts and chooses the
threshold with :func:`choose_from_histograms`, by the rules and tie-breaking of
:func:`fedct.common.metrics.operating_point.choose_operating_point`.

Bin i holds the scores in [edges[i], edges[i + 1]) (the last bin also holds 1.0).  At a
threshold on a bin edge the counts therefore give exactly the sensitivity and specificity of
the real scores, so the candidate thresholds are the lower edges of the occupied bins, and
when every score lies on a bin edge the choice equals the one made on the scores themselves.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedct.common.classes import COVID_INDEX
from fedct.common.metrics.classification import N_CLASSES, check_inputs
from fedct.common.metrics.operating_point import OperatingPoint, choose_operating_point

HIST_RULES = ("sens_at_spec", "youden")
_OTHER_INDEX = (COVID_INDEX + 1) % N_CLASSES


def histogram_edges(bins: int) -> np.ndarray:
    """The ``bins + 1`` edges of the equal-width bins on [0, 1]."""
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    return np.linspace(0.0, 1.0, bins + 1)


def score_histograms(
    labels: np.ndarray, probs: np.ndarray, bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """Counts per bin of the COVID-19 probability: (COVID-19 scans, other scans), int64."""
    labels, probs = check_inputs(labels, probs)
    edges = histogram_edges(bins)
    scores = probs[:, COVID_INDEX]
    bin_of = np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, bins - 1)
    covid = labels == COVID_INDEX
    return (
        np.bincount(bin_of[covid], minlength=bins).astype(np.int64),
        np.bincount(bin_of[~covid], minlength=bins).astype(np.int64),
    )


def _counts(values: np.ndarray | list[int], name: str) -> np.ndarray:
    counts = np.asarray(values)
    if counts.ndim != 1 or counts.size == 0 or not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(f"{name} must be a non-empty list of integer counts")
    if (counts < 0).any():
        raise ValueError(f"{name} holds negative counts")
    return counts.astype(np.int64)


def choose_from_histograms(
    covid_counts: np.ndarray | list[int],
    other_counts: np.ndarray | list[int],
    rule: str = "sens_at_spec",
    *,
    min_specificity: float = 0.95,
    chosen_on: str = "",
) -> OperatingPoint:
    """Choose the COVID-19 threshold on pooled histograms by ``rule`` (``sens_at_spec`` or
    ``youden``; see common/metrics/operating_point.py); the threshold is a bin edge.

    Raises ValueError for counts of different or zero length, negative counts, an unknown
    rule, or counts without both COVID-19 and other scans.
    """
    covid = _counts(covid_counts, "covid_counts")
    other = _counts(other_counts, "other_counts")
    if covid.shape != other.shape:
        raise ValueError(f"histograms differ in length: {covid.size} and {other.size} bins")
    if rule not in HIST_RULES:
        raise ValueError(f"operating-point rule on histograms must be one of {HIST_RULES}")
    edges = histogram_edges(covid.size)
    # Every scan of bin i stands at its lower edge: at edge thresholds it is called exactly as
    # its real score would be, which is all the rules look at.
    lower = edges[:-1]
    scores = np.concatenate([np.repeat(lower, covid), np.repeat(lower, other)])
    labels = np.repeat([COVID_INDEX, _OTHER_INDEX], [covid.sum(), other.sum()])
    probs = np.zeros((scores.size, N_CLASSES))
    probs[:, COVID_INDEX] = scores
    op = choose_operating_point(
        labels, probs, rule, min_specificity=min_specificity, chosen_on=chosen_on
    )
    top = int(np.flatnonzero(covid + other).max())
    if op.threshold > lower[top]:
        # Nothing is called COVID-19: the threshold must clear the top occupied bin, whose
        # real scores may lie anywhere below its upper edge (1.0 included in the last bin).
        above = edges[top + 1] if top + 1 < covid.size else np.nextafter(1.0, np.inf)
        op = replace(op, threshold=float(above))
    return op
