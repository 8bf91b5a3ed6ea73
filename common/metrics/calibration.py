"""Calibrated probabilities: temperature scaling fitted across sites, ECE, reliability bins.

Temperature scaling (Guo et al., 2017) divides a model's logits by one number T > 0 before
the softmax: T > 1 softens over-confident probabilities, T < 1 sharpens timid ones, and the
class with the largest probability never changes.  With three classes the order of the
scans by p(COVID-19) can move a little (it depends on the other two probabilities as well),
so its AUC can too.  It is computed from the probabilities alone: ``softmax(log p / T)`` is
``softmax(logits / T)``, since the log of a softmax is the logits less one constant per scan.

Fitted the federated way, without pooling any scan:

1. each site scores its tune split and returns :func:`tune_nll_grid`: the sum over its tune
   scans of the negative log-likelihood of the true class at every temperature of the fixed
   grid (:func:`temperature_grid`) — one number per temperature, an aggregate like the tune
   loss it already reports;
2. the coordinator sums the sites' grids and takes the temperature of the smallest sum
   (:func:`choose_temperature`): the T that minimises the pooled tune NLL, exactly what
   fitting on the pooled tune scans would choose on that grid;
3. the model card stores it as ``calibration`` (:class:`Calibration`), and everything that turns
   the model's logits into probabilities for people applies it (``fedct evaluate``, the
   radiologist's viewer; 1.0 when a card has none).

The operating point moves with the temperature: a threshold on p(COVID-19) means another
sensitivity once the probabilities are rescaled, so it must be chosen on calibrated
probabilities (docs/evaluation.md).

Calibration is measured on p(COVID-19) against COVID-19 vs rest: :func:`calibration_bins`
(the reliability diagram's equal-width bins) and :func:`calibration_scores` (the expected
calibration error and the Brier score).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedct.common.classes import COVID_INDEX
from fedct.common.metrics.classification import check_inputs, ratio

GRID_RANGE = (0.1, 10.0)  # the temperatures tried: log-spaced, 1.0 among them
GRID_POINTS = 81  # 1.06 × from one temperature to the next
# The smallest probability whose log is taken: a probability that underflowed to 0 in float64.
_TINY = 1e-300


def temperature_grid(
    low: float = GRID_RANGE[0], high: float = GRID_RANGE[1], points: int = GRID_POINTS
) -> np.ndarray:
    """``points`` temperatures log-spaced from ``low`` to ``high``; with the defaults 1.0 is
    one of them (the middle one)."""
    if not 0.0 < low < high or points < 2:
        raise ValueError(
            f"a temperature grid needs 0 < low < high and 2+ points, got {low}, {high}, {points}"
        )
    return np.geomspace(low, high, points)


def _log_probs(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(probs, _TINY, 1.0))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """The probabilities (N, C) of logits divided by ``temperature``: ``softmax(log p / T)``."""
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"a temperature must be a positive number, got {temperature}")
    scaled = _log_probs(np.asarray(probs, dtype=float)) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    out = np.exp(scaled)
    return out / out.sum(axis=1, keepdims=True)


def tune_nll_grid(labels: np.ndarray, probs: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """What a site returns: for each temperature of ``grid``, the sum over its scans of
    −log p_T(true class), p_T = :func:`apply_temperature` (p, T).  Zeros for no scans, so a
    site without a tune split adds nothing to the pool."""
    labels, probs = check_inputs(labels, probs)
    grid = np.asarray(grid, dtype=float)
    if grid.ndim != 1 or grid.size == 0 or not (np.isfinite(grid).all() and (grid > 0).all()):
        raise ValueError("the temperature grid must be a non-empty list of positive numbers")
    if labels.size == 0:
        return np.zeros(grid.size)
    logp = _log_probs(probs)
    scaled = logp[None, :, :] / grid[:, None, None]  # (T, N, C)
    top = scaled.max(axis=2, keepdims=True)
    log_norm = top[..., 0] + np.log(np.exp(scaled - top).sum(axis=2))
    true = scaled[:, np.arange(labels.size), labels]
    return (log_norm - true).sum(axis=1)


@dataclass(frozen=True)
class Calibration:
    """A model's temperature, the grid it was chosen from and on what data: the model card's
    ``calibration`` object."""

    temperature: float
    grid: tuple[float, ...]
    chosen_on: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "grid": list(self.grid),
            "chosen_on": self.chosen_on,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Calibration:
        """The inverse of to_dict; ValueError naming what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("calibration must be a JSON object")
        if unknown := set(data) - {"temperature", "grid", "chosen_on"}:
            raise ValueError(f"calibration has unknown fields {', '.join(sorted(unknown))}")
        temperature = data.get("temperature")
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            raise ValueError("calibration.temperature must be a number")
        if not (np.isfinite(temperature) and temperature > 0):
            raise ValueError(f"calibration.temperature must be positive, got {temperature}")
        grid = data.get("grid", [])
        if not isinstance(grid, list) or not all(
            isinstance(t, int | float) and not isinstance(t, bool) for t in grid
        ):
            raise ValueError("calibration.grid must be a list of numbers")
        return cls(
            float(temperature), tuple(float(t) for t in grid), str(data.get("chosen_on", ""))
        )


def choose_temperature(
    nll_grids: Sequence[np.ndarray | Sequence[float]],
    grid: np.ndarray | Sequence[float],
    *,
    chosen_on: str = "",
) -> Calibration:
    """The coordinator's choice: the temperature of ``grid`` whose summed tune NLL over the
    sites' ``nll_grids`` is smallest (the lowest such temperature on a tie).  ValueError when
    no site sent a grid, a grid has another length, or holds a negative or non-finite sum."""
    grid = np.asarray(grid, dtype=float)
    if not nll_grids:
        raise ValueError("no site sent its tune NLL over the temperature grid")
    sums = np.zeros(grid.size)
    for i, values in enumerate(nll_grids):
        values = np.asarray(values, dtype=float)
        if values.shape != grid.shape:
            raise ValueError(
                f"site {i}: {values.size} tune NLL sums for a grid of {grid.size} temperatures"
            )
        if not (np.isfinite(values).all() and (values >= 0).all()):
            raise ValueError(f"site {i}: tune NLL sums must be finite and non-negative")
        sums += values
    if not sums.any():
        raise ValueError("the sites' tune splits hold no scan")
    best = int(np.argmin(sums))
    return Calibration(float(grid[best]), tuple(float(t) for t in grid), chosen_on)


def calibration_bins(
    labels: np.ndarray, probs: np.ndarray, n_bins: int = 10
) -> dict[str, np.ndarray]:
    """Reliability-diagram bins of the COVID-19 probability: equal-width bins on [0, 1].

    Bin i holds scores in (edges[i], edges[i + 1]] (the first also holds 0), as in
    scikit-learn's ``calibration_curve``.  Returns ``edges`` (n_bins + 1), and per bin
    ``count``, ``mean_predicted`` and ``fraction_covid`` (NaN for empty bins).
    """
    labels, probs = check_inputs(labels, probs)
    scores = probs[:, COVID_INDEX]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bin_of = np.searchsorted(edges[1:-1], scores)
    count = np.bincount(bin_of, minlength=n_bins)
    return {
        "edges": edges,
        "count": count,
        "mean_predicted": ratio(np.bincount(bin_of, weights=scores, minlength=n_bins), count),
        "fraction_covid": ratio(
            np.bincount(bin_of, weights=labels == COVID_INDEX, minlength=n_bins), count
        ),
    }


def calibration_scores(labels: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> dict[str, float]:
    """``ece``: the expected calibration error of p(COVID-19) over the bins of
    :func:`calibration_bins` (|fraction COVID-19 − mean predicted| weighted by each bin's
    share of scans); ``brier``: the mean squared error of p(COVID-19) against COVID-19 vs
    rest.  NaN for no scans."""
    labels, probs = check_inputs(labels, probs)
    if labels.size == 0:
        return {"ece": float("nan"), "brier": float("nan")}
    bins = calibration_bins(labels, probs, n_bins)
    filled = bins["count"] > 0
    gaps = np.abs(bins["fraction_covid"][filled] - bins["mean_predicted"][filled])
    ece = float(np.sum(gaps * bins["count"][filled]) / labels.size)
    brier = float(np.mean((probs[:, COVID_INDEX] - (labels == COVID_INDEX)) ** 2))
    return {"ece": ece, "brier": brier}


def ece_noise_floor(
    probs: np.ndarray, n_bins: int = 10, draws: int = 1000, seed: int = 0
) -> dict[str, float]:
    """The ECE that perfectly calibrated probabilities would show on these scans: labels
    drawn COVID-19 with probability p(COVID-19) of each scan, ``draws`` times (seeded); the
    median and the 5th and 95th percentiles.  On a few dozen scans it is far above 0, so an
    ECE there says little below it."""
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2 or probs.shape[0] == 0:
        return {"median": float("nan"), "p5": float("nan"), "p95": float("nan")}
    rng = np.random.default_rng(seed)
    scores = probs[:, COVID_INDEX]
    other = (COVID_INDEX + 1) % probs.shape[1]
    values = [
        calibration_scores(
            np.where(rng.random(scores.size) < scores, COVID_INDEX, other), probs, n_bins
        )["ece"]
        for _ in range(draws)
    ]
    low, median, high = np.percentile(values, [5, 50, 95])
    return {"median": float(median), "p5": float(low), "p95": float(high)}
