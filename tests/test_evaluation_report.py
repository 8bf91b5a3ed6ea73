"""``fedct evaluate``'s paths that should just work (a pulled model's card, an earlier --out,
a cache of other settings) and the sections of its report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from page_parts import Page
from test_evaluate import STORED_OP, cache, evaluate_cli, make_run, write_mosmed

from fedct.common.cache.store import write_settings
from fedct.common.metrics.bootstrap import auc_interval
from fedct.common.metrics.calibration import calibration_scores
from fedct.common.metrics.classification import wilson_interval

__all__ = ["cache"]  # the fixture, shared with test_evaluate


def test_a_pulled_models_card_finds_its_weights(tmp_path: Path, cache: Path) -> None:
    card = make_run(tmp_path / "run", operating_point=STORED_OP)
    pulled = tmp_path / "pulled"
    pulled.mkdir()
    shutil.copy(card.with_name("round_001.safetensors"), pulled / "model.safetensors")
    shutil.copy(card, pulled / "model.card.json")  # its "checkpoint" still says round_001
    out = tmp_path / "out"
    args = ("--model", pulled / "model.card.json", "--data", cache, "--out", out, "--cams", "0")
    assert evaluate_cli(*args) == 0
    assert json.loads((out / "metrics.json").read_text())["model"]["checkpoint"] == (
        "model.safetensors"
    )


def test_an_earlier_evaluation_is_replaced_only_with_force(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    card = make_run(tmp_path / "run", operating_point=STORED_OP)
    args = ("--model", card, "--data", cache, "--out", tmp_path / "out", "--cams", "0")
    assert evaluate_cli(*args) == 0
    before = (tmp_path / "out" / "metrics.json").read_text()
    capsys.readouterr()
    assert evaluate_cli(*args, "--splits", "test") == 2
    err = capsys.readouterr().err
    assert "holds an earlier evaluation" in err and "--force" in err
    assert (tmp_path / "out" / "metrics.json").read_text() == before
    assert evaluate_cli(*args, "--splits", "test", "--force") == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["n_scans"] == 12


def test_a_cache_of_other_settings_is_refused(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    shutil.copytree(cache, other)
    write_settings(other, {"size": 32, "fraction": 0.5, "normalize": "lung-window"})
    card = make_run(tmp_path / "run", operating_point=STORED_OP)
    assert evaluate_cli("--model", card, "--data", other, "--out", tmp_path / "out") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "normalize='lung-window'" in err and "normalize='ai-corona'" in err
    assert "raw folder" in err and not (tmp_path / "out").exists()


def test_report_sections_severity_calibration_cams_and_provenance(tmp_path: Path) -> None:
    write_mosmed(tmp_path / "mosmed")
    run = {"run_key": "k1", "flower_run_id": 42}
    software = {"fedct": "0.1.0", "torch": "2.14.1", "timm": "1", "flwr": "1.41.0"}
    card = make_run(tmp_path / "run", operating_point=STORED_OP, run=run, software=software)
    out = tmp_path / "out"
    assert evaluate_cli("--model", card, "--data", tmp_path / "mosmed", "--out", out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    page = Page((out / "report.html").read_text())
    assert page.sections == [
        "ROC curve: COVID-19 vs rest",
        "Metrics with patient-bootstrap 95% CIs",
        "Sensitivity by severity (MosMedData CT-0 to CT-4)",
        "Per class",
        "Confusion matrices",
        "Calibration of p(COVID-19)",
        "Evidence for COVID-19",
    ]
    overview = dict(row for row in page.tables[0] if len(row) == 2)
    assert overview["run"] == "run key k1, Flower run id 42"
    assert "fedct 0.1.0" in overview["trained with"] and "torch 2.14.1" in overview["trained with"]
    assert "flwr" in overview["evaluated with"] and metrics["software"]["torch"]

    severity = page.table_with("severity")
    assert [row[0] for row in severity[1:]] == ["CT-0", "CT-2"]
    assert [row[1] for row in severity[1:]] == ["3", "3"]
    assert [g["severity"] for g in metrics["by_severity"]] == ["CT-0", "CT-2"]
    names = [row[0] for row in page.table_with("metric")[1:]]
    assert (
        "AUC, COVID-19 vs rest" in names and "sensitivity for COVID-19 (at the threshold)" in names
    )

    assert 0 <= metrics["calibration"]["ece"] <= 1 and 0 <= metrics["calibration"]["brier"] <= 1
    calibration = dict(page.table_with("temperature applied"))
    assert float(calibration["Brier score (COVID-19 vs rest)"]) == pytest.approx(
        metrics["calibration"]["brier"], abs=1e-3
    )
    bins = page.table_with("p(COVID-19) bin")
    assert sum(int(row[1]) for row in bins[1:]) == metrics["n_scans"]
    assert page.images.count("evidence colour scale") == 1
    cams = [alt for alt in page.images if alt.startswith("CAM of scan")]
    plain = [alt for alt in page.images if alt.startswith("slice of scan")]
    assert cams and len(cams) == len(plain)
    assert (
        f"{metrics['decisions_differ']} of {metrics['n_scans']} scans"
        in (out / "report.html").read_text()
    )


def test_auc_interval_wilson_interval_and_calibration_scores() -> None:
    labels = np.array([0, 0, 0, 2, 2, 2, 1, 1])
    separated = np.eye(3)[labels] * 0.9 + 0.1 / 3
    assert auc_interval(labels, separated, [f"p{i}" for i in range(8)]) == (1.0, 1.0)
    rng = np.random.default_rng(0)
    noisy = rng.dirichlet(np.ones(3), size=8)
    low, high = auc_interval(labels, noisy, [f"p{i}" for i in range(8)])
    assert 0.0 <= low < high <= 1.0
    assert all(np.isnan(auc_interval(np.zeros(4, int), noisy[:4], list("abcd"))))
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)
    perfect = calibration_scores(labels, np.eye(3)[labels])
    assert perfect == {"ece": 0.0, "brier": 0.0}
    flat = calibration_scores(labels, np.full((8, 3), 1 / 3))
    assert flat["brier"] == pytest.approx(np.mean((1 / 3 - (labels == 2)) ** 2))
    assert flat["ece"] == pytest.approx(abs(3 / 8 - 1 / 3))
