"""Temperature scaling fitted across sites from tune NLL sums, its card field, ECE."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fedct.common.metrics.calibration import (
    Calibration,
    apply_temperature,
    calibration_scores,
    choose_temperature,
    temperature_grid,
    tune_nll_grid,
)
from fedct.common.metrics.pooled_operating_point import choose_from_histograms, score_histograms
from fedct.common.run.directory import CheckpointLoadError
from fedct.common.run.load import calibration_from_card


def _overconfident(n: int, seed: int, sharpness: float) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from well-calibrated probabilities, and the probabilities of a model
    whose logits are those times ``sharpness`` (over-confident for sharpness > 1)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, size=(n, 3))
    truth = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    labels = np.array([rng.choice(3, p=p) for p in truth])
    return labels, torch.softmax(torch.from_numpy(logits * sharpness), dim=1).numpy()


def test_a_temperature_rescales_the_logits() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 3.0]], dtype=torch.float64)
    probs = torch.softmax(logits, dim=1).numpy()
    np.testing.assert_allclose(apply_temperature(probs, 1.0), probs, atol=1e-12)
    expected = torch.softmax(logits / 2.5, dim=1).numpy()
    np.testing.assert_allclose(apply_temperature(probs, 2.5), expected, atol=1e-12)
    with pytest.raises(ValueError, match="positive"):
        apply_temperature(probs, 0.0)
    grid = temperature_grid()
    assert grid[0] == pytest.approx(0.1) and grid[-1] == pytest.approx(10.0)
    assert np.isclose(grid, 1.0).any()


def test_a_site_sends_its_tune_nll_at_every_temperature() -> None:
    labels, probs = _overconfident(40, 1, 2.0)
    grid = np.array([0.5, 1.0, 2.0])
    sums = tune_nll_grid(labels, probs, grid)
    for temperature, value in zip(grid, sums, strict=True):
        scaled = apply_temperature(probs, temperature)
        assert value == pytest.approx(-np.log(scaled[np.arange(40), labels]).sum())
    assert tune_nll_grid(np.zeros(0, np.int64), np.zeros((0, 3)), grid).tolist() == [0, 0, 0]


def test_the_federated_choice_is_the_pooled_one_and_calibrates() -> None:
    labels, probs = _overconfident(600, 2, 2.0)
    grid = temperature_grid()
    parts = np.array_split(np.arange(600), [100, 350])  # three sites of unequal size
    grids = [tune_nll_grid(labels[p], probs[p], grid) for p in parts]
    federated = choose_temperature(grids, grid, chosen_on="tune splits of 3 sites")
    pooled = choose_temperature([tune_nll_grid(labels, probs, grid)], grid)
    assert federated.temperature == pooled.temperature
    assert 1.6 < federated.temperature < 2.5  # the logits were doubled
    fresh_labels, fresh_probs = _overconfident(2000, 3, 2.0)
    before = calibration_scores(fresh_labels, fresh_probs)["ece"]
    after = calibration_scores(fresh_labels, apply_temperature(fresh_probs, federated.temperature))[
        "ece"
    ]
    assert after < 0.05 < before
    assert Calibration.from_dict(federated.to_dict()) == federated


def test_the_operating_point_moves_with_the_temperature() -> None:
    labels, probs = _overconfident(300, 4, 3.0)
    thresholds = [
        choose_from_histograms(*score_histograms(labels, apply_temperature(probs, t), 200))
        for t in (1.0, 3.0)
    ]
    assert thresholds[0].threshold != thresholds[1].threshold


@pytest.mark.parametrize(
    ("grids", "message"),
    [
        ([], "no site"),
        ([[1.0, 2.0]], "2 tune NLL sums for a grid of 3"),
        ([[1.0, -2.0, 3.0]], "non-negative"),
        ([[1.0, float("nan"), 3.0]], "finite"),
        ([[0.0, 0.0, 0.0]], "hold no scan"),
    ],
)
def test_the_coordinator_refuses_bad_grids(grids: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        choose_temperature(grids, [0.5, 1.0, 2.0])


def test_the_card_field_is_checked() -> None:
    card = {"calibration": {"temperature": 1.7, "grid": [1.0, 1.7], "chosen_on": "tune"}}
    assert calibration_from_card(card, Path("c")).temperature == 1.7
    assert calibration_from_card({}, Path("c")) is None
    for bad in ({"temperature": -1}, {"temperature": "2"}, {"temperature": 1, "x": 1}, []):
        with pytest.raises(CheckpointLoadError, match="invalid calibration"):
            calibration_from_card({"calibration": bad}, Path("c"))
