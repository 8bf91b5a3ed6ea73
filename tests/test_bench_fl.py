"""The figures of the federated benchmarks, read from small hand-written run directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from rich.console import Console

from bench.fl_overhead import rounding_effect, run_figures, targets
from bench.intensity_baseline import BINS, histograms
from fedct.common.cache.dataset import CacheDataset
from fedct.common.run.directory import RunDirectory
from fedct.server.app import main
from fedct.server.launch.baselines import comparison_rows, comparison_table, external_result


def write_run(path: Path, upload: int, aucs: list[float], tune: list[float]) -> RunDirectory:
    """Rounds 0..len(aucs)-1 of a two-site run: round r takes 2r + 1 s, its train phase
    2r + 0.2 s, its sites r and 2r s."""
    run_dir = RunDirectory(path)
    path.mkdir()
    for r, (auc, tune_auc) in enumerate(zip(aucs, tune, strict=True)):
        participants = [
            {"site": site, "upload-bytes": upload, "metrics": {"train-seconds": seconds}}
            for site, seconds in (("a", float(r)), ("b", 2.0 * r))
        ]
        line = {
            "seconds": 2.0 * r + 1,
            "train-phase-seconds": 2.0 * r + 0.2 if r else None,
            "failures": 0,
            "upload-bytes": 2 * upload if r else 0,
            "download-bytes": 2 * upload if r else 0,
            "federated": {"tune-auc_covid": tune_auc},
            "central": {"mosmed-auc_covid": auc, "mosmed-loss": 1.0},
        }
        card = {"train": {"participants": participants}} if r else {}
        run_dir.save_round(r, {"w": np.zeros(1, np.float32)}, card, line, {})
        run_dir.update_best(r, "tune-auc_covid", tune_auc)
    return run_dir


def test_overhead_figures_and_targets(tmp_path: Path) -> None:
    fp32 = run_figures(write_run(tmp_path / "32", 1000, [0.5, 0.7, 0.8], [0.5, 0.9, 0.6]), 9.0)
    fp16 = run_figures(write_run(tmp_path / "16", 520, [0.5, 0.7, 0.803], [0.5, 0.9, 0.6]), 9.0)

    assert [(r["round"], r["ratio"], r["slowest_site"]) for r in fp32["rounds"]] == [
        (1, 1.5, "b"),
        (2, 1.25, "b"),
    ]
    assert fp32["mean_ratio"] == pytest.approx(1.375)
    assert fp32["mean_ratio_from_round2"] == pytest.approx(1.25)
    assert fp32["round0_seconds"] == 1.0
    assert fp32["mean_upload_bytes_per_client"] == fp32["mean_download_bytes_per_client"] == 1000
    assert fp32["final_auc"] == {"mosmed": 0.8}

    met = targets({"float32": fp32, "float16": fp16})
    assert met["overhead"]["round1"] == pytest.approx(1.1)
    assert met["overhead"]["figure"] == pytest.approx(1.05)  # judged from round 2
    assert met["overhead"]["met"]
    assert met["fp16_bytes"]["figure"] == pytest.approx(0.52)
    assert met["fp16_bytes"]["fixed_bytes_per_message"] == 40
    assert not met["fp16_bytes"]["met"]
    # A few header bytes over half: met at the 4 decimals the target is judged at, and
    # recorded as not met exactly.
    aucs, tune = [0.5, 0.7, 0.8], [0.5, 0.9, 0.6]
    big32 = run_figures(write_run(tmp_path / "b32", 1_000_000, aucs, tune), 9.0)
    big16 = run_figures(write_run(tmp_path / "b16", 500_010, aucs, tune), 9.0)
    near = targets({"float32": big32, "float16": big16})["fp16_bytes"]
    assert near["figure"] == pytest.approx(0.50001)
    assert near["met"] and not near["met_exactly"]
    assert met["fp16_auc"]["figure"]["mosmed"] == pytest.approx(0.003)
    assert met["fp16_auc"]["met"]


def test_an_arm_is_read_at_its_best_tune_round_and_its_last(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", 1000, [0.5, 0.7, 0.8], [0.5, 0.9, 0.6])
    with open(run_dir.path / "metrics.jsonl") as handle:
        lines = [json.loads(line) for line in handle]
    lines[1]["central"].update({"mosmed-auc_covid_ci_low": 0.6, "mosmed-auc_covid_ci_high": 0.8})
    (run_dir.path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    arm = external_result(run_dir, "mosmed")
    assert arm == {
        "round": 1,
        "auc": 0.7,
        "ci": [0.6, 0.8],
        "final": {"round": 2, "auc": 0.8, "ci": [None, None]},
    }
    rows = comparison_rows({"federated": arm, "centralized": arm, "local": {"site-a": arm}})
    assert list(rows) == ["federated", "centralized", "site-a alone"]
    console = Console(width=120, record=True)
    console.print(comparison_table(rows, "mosmed", "tune-auc_covid"))
    text = console.export_text()
    assert "0.700 (0.600–0.800)" in text and "site-a alone" in text


def test_rounding_effect_rescores_the_final_model(
    site_caches: dict[str, Path], run_config: dict[str, Any], task_identity: None, make_grid: Any
) -> None:
    nodes = [{"data-path": str(site_caches[s]), "site": s} for s in ("site_a", "site_b")]
    config = {**run_config, "num-server-rounds": 1, "cross-site": False}
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    main(make_grid(nodes, config), context)

    run_dir = RunDirectory(Path(config["run-dir"]))
    effect = rounding_effect(run_dir)
    recorded = run_dir.metrics()[-1]["central"]["ext-auc_covid"]
    assert effect["float32"]["ext"] == pytest.approx(recorded)
    assert abs(effect["change"]["ext"]) <= 0.05


def test_intensity_histograms_are_normalised_per_scan(site_caches: dict[str, Path]) -> None:
    data = CacheDataset(site_caches["site_a"])
    features, labels = histograms(data)
    assert features.shape == (len(data), BINS)
    np.testing.assert_allclose(features.sum(axis=1), 1.0)
    assert labels.tolist() == [item.label for item in data]
