"""The COVID-19-vs-rest decision threshold: chosen on the tuning split, stored with the model.

The operating point is chosen once, on tuning data, and later applied unchanged to every test
or external set; it is never re-chosen on the data being reported.  Rules:

* ``sens_at_spec`` (default): the highest sensitivity whose specificity is >= min_specificity;
* ``youden``: the largest Youden index J = sensitivity + specificity - 1;
* ``fixed``: a threshold given by the caller (its tuning sensitivity/specificity are recorded).

Ties go to the highest threshold, i.e. the more specific choice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from fedct.common.classes import COVID_INDEX
from fedct.common.metrics.classification import check_inputs, weighted_roc

RULES = ("sens_at_spec", "youden", "fixed")
# Specificities are ratios of counts; this keeps e.g. 19/20 from failing ">= 0.95" by rounding.
_SPEC_TOLERANCE = 1e-12


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold on the COVID-19 probability and where and how it was chosen."""

    threshold: float
    rule: str
    chosen_on: str
    sensitivity: float
    specificity: float
    min_specificity: float | None = None

    def predict_covid(self, probs: np.ndarray) -> np.ndarray:
        """True where a scan is called COVID-19: probability >= the stored threshold."""
        return np.asarray(probs, dtype=float)[:, COVID_INDEX] >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OperatingPoint:
        """The inverse of to_dict; ValueError on missing or unknown fields or an unknown rule."""
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.name != "min_specificity"}
        if missing := required - data.keys():
            raise ValueError(f"operating point lacks {', '.join(sorted(missing))}")
        if unknown := data.keys() - names:
            raise ValueError(f"operating point has unknown fields {', '.join(sorted(unknown))}")
        if data["rule"] not in RULES:
            raise ValueError(f"unknown operating-point rule {data['rule']!r}; expected {RULES}")
        return cls(**data)


def choose_operating_point(
    labels: np.ndarray,
    probs: np.ndarray,
    rule: str = "sens_at_spec",
    *,
    min_specificity: float = 0.95,
    threshold: float = 0.5,
    chosen_on: str = "",
) -> OperatingPoint:
    """Choose the COVID-19 threshold on tuning data by ``rule`` (see the module docstring).

    ``threshold`` is used only by ``fixed``, ``min_specificity`` only by ``sens_at_spec``.
    ``chosen_on`` describes the tuning data, e.g. "tune split of site A, 40 scans".  Raises
    ValueError for an unknown rule, a min_specificity outside [0, 1], or tuning data without
    both COVID-19 and other scans.
    """
    if rule not in RULES:
        raise ValueError(f"unknown operating-point rule {rule!r}; expected one of {RULES}")
    if not 0.0 <= min_specificity <= 1.0:
        raise ValueError(f"min_specificity must lie in [0, 1], got {min_specificity}")
    labels, probs = check_inputs(labels, probs)
    positive = labels == COVID_INDEX
    if positive.all() or not positive.any():
        raise ValueError(
            f"cannot choose an operating point on {chosen_on or 'this tuning data'}: it has "
            f"{int(positive.sum())} COVID-19 and {int((~positive).sum())} other scans; "
            "both are needed to measure sensitivity and specificity"
        )
    scores = probs[:, COVID_INDEX]
    if rule == "fixed":
        called = scores >= threshold
        return OperatingPoint(
            threshold=float(threshold),
            rule=rule,
            chosen_on=chosen_on,
            sensitivity=float(called[positive].mean()),
            specificity=float(1.0 - called[~positive].mean()),
        )
    fpr, tpr, candidates = weighted_roc(positive, scores, np.ones((1, labels.size)))
    sens, spec = tpr[0], 1.0 - fpr[0]
    # The first candidate (inf: nothing called COVID-19) is replaced by the smallest float
    # above every score, which acts the same and stays JSON-serialisable.
    candidates[0] = np.nextafter(candidates[1], np.inf)
    if rule == "youden":
        best = int(np.argmax(sens + spec - 1.0))
        floor = None
    else:
        feasible = spec >= min_specificity - _SPEC_TOLERANCE
        best = int(np.argmax(np.where(feasible, sens, -1.0)))
        floor = float(min_specificity)
    return OperatingPoint(
        threshold=float(candidates[best]),
        rule=rule,
        chosen_on=chosen_on,
        sensitivity=float(sens[best]),
        specificity=float(spec[best]),
        min_specificity=floor,
    )
