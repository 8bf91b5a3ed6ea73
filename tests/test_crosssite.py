"""The federated operating point (pooled tune histograms) and the cross-site validation at
the end of a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fedct.common.classes import COVID_INDEX
from fedct.common.metrics.operating_point import choose_operating_point
from fedct.common.metrics.pooled_operating_point import (
    choose_from_histograms,
    histogram_edges,
    score_histograms,
)
from fedct.server.app import main
from fedct.server.crosssite import GLOBAL, cross_site_jobs, plan_batches
from fedct.server.report import render_run

BINS = 20


def _probs(scores: np.ndarray) -> np.ndarray:
    probs = np.empty((scores.size, 3))
    probs[:, COVID_INDEX] = scores
    probs[:, [i for i in range(3) if i != COVID_INDEX]] = ((1 - scores) / 2)[:, None]
    return probs


def _tuning_data(seed: int, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels whose COVID-19 scans score higher on average, and their probabilities."""
    rng = np.random.default_rng(seed)
    covid = rng.random(scores.size) < 0.2 + 0.6 * scores
    covid[:2] = [True, False]
    labels = np.where(covid, COVID_INDEX, rng.choice([i for i in range(3) if i != COVID_INDEX]))
    return labels, _probs(scores)


def _from_histograms(labels: np.ndarray, probs: np.ndarray, rule: str, spec: float) -> Any:
    covid, other = score_histograms(labels, probs, BINS)
    return choose_from_histograms(covid, other, rule, min_specificity=spec, chosen_on="t")


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    ("rule", "spec"), [("sens_at_spec", 0.95), ("sens_at_spec", 0.7), ("youden", 0.95)]
)
def test_histograms_give_the_exact_operating_point_on_bin_edges(
    seed: int, rule: str, spec: float
) -> None:
    edges = histogram_edges(BINS)
    scores = edges[np.random.default_rng(seed).integers(0, BINS, 40)]
    labels, probs = _tuning_data(seed, scores)
    exact = choose_operating_point(labels, probs, rule, min_specificity=spec, chosen_on="t")
    assert _from_histograms(labels, probs, rule, spec) == exact


@pytest.mark.parametrize("top_bin", [BINS - 2, BINS - 1])
def test_calling_nothing_covid_clears_the_top_occupied_bin(top_bin: int) -> None:
    # The highest score is another scan's: only calling nothing COVID-19 has specificity 1.
    edges = histogram_edges(BINS)
    scores = edges[[top_bin, 3, 5, 8]]
    labels = np.array([0, COVID_INDEX, 0, COVID_INDEX])
    exact = choose_operating_point(labels, _probs(scores), min_specificity=1.0)
    pooled = _from_histograms(labels, _probs(scores), "sens_at_spec", 1.0)
    assert exact.threshold == np.nextafter(edges[top_bin], 2.0)
    # The last bin also holds 1.0, so clearing it takes a threshold above 1.
    clear = edges[top_bin + 1] if top_bin < BINS - 1 else np.nextafter(1.0, 2.0)
    assert pooled.threshold == clear
    assert (pooled.sensitivity, pooled.specificity) == (exact.sensitivity, exact.specificity)
    assert not pooled.predict_covid(_probs(scores)).any()


@pytest.mark.parametrize("seed", range(6))
def test_histogram_sensitivity_and_specificity_are_those_of_the_real_scores(seed: int) -> None:
    scores = np.random.default_rng(seed).random(60)
    scores[0] = 1.0  # the last bin holds 1.0
    labels, probs = _tuning_data(seed, scores)
    for rule in ("sens_at_spec", "youden"):
        op = _from_histograms(labels, probs, rule, 0.8)
        assert op.threshold in histogram_edges(BINS) or op.threshold == np.nextafter(1.0, 2.0)
        called = op.predict_covid(probs)
        covid = labels == COVID_INDEX
        assert op.sensitivity == called[covid].mean()
        assert op.specificity == 1.0 - called[~covid].mean()


def test_score_histograms_bin_edges_and_errors() -> None:
    scores = np.array([0.0, 0.05, 0.0999, 0.1, 0.975, 1.0])
    labels = np.array([COVID_INDEX, 0, 0, COVID_INDEX, 1, COVID_INDEX])
    covid, other = score_histograms(labels, _probs(scores), BINS)
    assert np.flatnonzero(covid).tolist() == [0, 2, 19] and covid.sum() == 3
    assert np.flatnonzero(other).tolist() == [1, 19] and other.sum() == 3
    with pytest.raises(ValueError, match="differ in length"):
        choose_from_histograms([1, 0], [0, 1, 0])
    with pytest.raises(ValueError, match="negative"):
        choose_from_histograms([1, -1], [0, 1])
    with pytest.raises(ValueError, match="must be one of"):
        choose_from_histograms([1, 0], [0, 1], "fixed")
    with pytest.raises(ValueError, match="0 other scans"):
        choose_from_histograms([1, 2], [0, 0])


def test_cross_site_batches_send_each_node_one_model_at_a_time() -> None:
    owners = {"a": 1, "b": 2, "gone": 9}
    own = cross_site_jobs([1, 2], owners, all_pairs=False)
    assert own == [(1, GLOBAL), (2, GLOBAL), (1, "a"), (2, "b")]
    assert plan_batches(own) == [[(1, GLOBAL), (2, GLOBAL)], [(1, "a"), (2, "b")]]
    every = cross_site_jobs([1, 2], owners, all_pairs=True)
    batches = plan_batches(every)
    assert sorted(job for batch in batches for job in batch) == sorted(every)
    assert len(batches) == 4 and all(len({n for n, _ in b}) == len(b) for b in batches)


def _run(make_grid: Any, nodes: list[dict[str, Any]], config: dict[str, Any]) -> Any:
    grid = make_grid(nodes, config)
    main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    return grid


def test_cross_site_matrix_and_operating_point_of_a_tiny_run(
    site_caches: dict[str, Path],
    run_config: dict[str, Any],
    tmp_path: Path,
    task_identity: None,
    make_grid: Any,
) -> None:
    # Site A's tune split holds 4 scans: its policy lets histograms over so few leave.
    nodes = [
        {
            "data-path": str(site_caches[s]),
            "site": s,
            "audit-log": str(tmp_path / s),
            "min-histogram-scans": 4,
        }
        for s in ("site_a", "site_b")
    ]
    config = {**run_config, "num-server-rounds": 1, "strategy": "fedbn"}
    grid = _run(make_grid, nodes, config)
    run_dir = Path(config["run-dir"])
    cross = json.loads((run_dir / "cross_site.json").read_text())
    assert set(cross) == {
        "sites",
        "models",
        "global_round",
        "auc_covid",
        "accuracy",
        "n",
        "auc_covid_ci",
    }
    assert cross["global_round"] == 1 and cross["n"][0][:2] == [2, 2]
    assert cross["sites"] == ["site_a", "site_b"]
    assert cross["models"] == [GLOBAL, "site_a", "site_b"]
    for metric in ("auc_covid", "accuracy"):
        (a_global, a_own, a_other), (b_global, b_other, b_own) = cross[metric]
        assert None not in (a_global, a_own, b_global, b_own)
        assert a_other is None and b_other is None
    cross_site = [m for m in grid.sent if m.content["config"].get("splits") == "test"]
    assert len(cross_site) == 4 and not any(m.content["config"]["fedbn"] for m in cross_site[2:])
    assert "Cross-site evaluation" in render_run(run_dir)

    card = json.loads((run_dir / "round_001.card.json").read_text())
    op = card["operating_point"]
    assert op["rule"] == "sens_at_spec" and op["min_specificity"] == 0.95
    assert op["chosen_on"] == "pooled tune splits of 1 site, 4 scans"
    assert op["threshold"] in histogram_edges(50) or op["threshold"] > 1.0
    assert json.loads((run_dir / "round_000.card.json").read_text())["operating_point"] is None
    for site in card["federated_evaluation"]["sites"]:
        assert not any(key.startswith("tune-hist") for key in site["metrics"])
    assert "tune-auc_covid" in card["federated_evaluation"]["aggregated"]

    everywhere = {**config, "cross-site-local-models": True, "run-dir": str(tmp_path / "all")}
    _run(make_grid, nodes, everywhere)
    cross = json.loads((tmp_path / "all" / "cross_site.json").read_text())
    assert all(
        v is not None for metric in ("auc_covid", "accuracy") for v in sum(cross[metric], [])
    )
