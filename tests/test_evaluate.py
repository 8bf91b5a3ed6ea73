"""``fedct evaluate`` end to end on a tiny model, a tiny cache and a raw MosMedData folder."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from fedct.client import commands
from fedct.client.evaluator.evaluate import PREDICTION_FIELDS, UNTUNED, run
from fedct.common.cache.config import PrepareConfig
from fedct.common.cache.dataset import CacheDataset, make_loader
from fedct.common.cache.prepare import prepare
from fedct.common.cache.store import write_manifest, write_scan, write_settings
from fedct.common.classes import GLOBAL_CLASSES
from fedct.common.metrics.operating_point import choose_operating_point
from fedct.common.model.classifier import ModelConfig, build_model
from fedct.common.run.directory import CheckpointLoadError, RunDirectory
from fedct.common.run.load import load_checkpoint, prepare_settings_from_card
from fedct.common.training.loop import evaluate
from fedct.server.central_eval import CentralEvaluator
from fedct.server.global_model import GlobalModel

TINY = ModelConfig(backbone="test_efficientnet")
TINY_PREPARE = {"image-size": 32, "slice-fraction": 0.5, "normalize": "ai-corona"}
STORED_OP = {
    "threshold": 0.37,
    "rule": "sens_at_spec",
    "chosen_on": "tune split of site-a (9 scans)",
    "sensitivity": 0.8,
    "specificity": 0.95,
    "min_specificity": 0.95,
}
EXTERNAL_LINK = re.compile(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", re.IGNORECASE)


def make_run(run_dir: Path, **card: Any) -> Path:
    """A run directory with one round of a test_efficientnet model; returns its card path."""
    torch.manual_seed(0)
    model = build_model(TINY)
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    base = {"model_config": dataclasses.asdict(TINY), "run_config": dict(TINY_PREPARE)}
    RunDirectory(run_dir).save_round(1, state, {**base, **card}, {}, {})
    return RunDirectory(run_dir).card_path(1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 scans of 20 patients, classes by brightness, split into tune and test."""
    root = tmp_path_factory.mktemp("cache")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        cls = i % 3
        patient = f"p{min(i, 19):02d}"
        pixels = np.clip(rng.normal(60 + 70 * cls, 25, (4 + i % 3, 32, 32)), 0, 255)
        write_scan(root, f"s{i:02d}", pixels.astype(np.uint8))
        rows.append(
            {
                "scan_id": f"s{i:02d}",
                "patient_id": patient,
                "label": GLOBAL_CLASSES[cls],
                "global_class": GLOBAL_CLASSES[cls],
                "class_index": cls,
                "split": "tune" if i < 12 else "test",
            }
        )
    write_manifest(root, rows)
    write_settings(root, {"size": 32, "fraction": 0.5, "normalize": "ai-corona"})
    return root


def evaluate_cli(*argv: object) -> int:
    parser = argparse.ArgumentParser()
    commands.evaluate.add_arguments(parser)
    base = ["--n-boot", "20", "--device", "cpu", "--workers", "1"]
    return run(parser.parse_args([*base, *(str(a) for a in argv)]))


def read_outputs(out: Path) -> tuple[list[dict[str, str]], dict[str, Any], str]:
    with open(out / "predictions.csv", newline="") as handle:
        predictions = list(csv.DictReader(handle))
    return (
        predictions,
        json.loads((out / "metrics.json").read_text()),
        (out / "report.html").read_text(),
    )


def test_cache_with_the_cards_operating_point(tmp_path: Path, cache: Path) -> None:
    calibration = {"temperature": 2.0, "grid": [1.0, 2.0], "chosen_on": "tune splits, 9 scans"}
    card = make_run(tmp_path / "run", operating_point=STORED_OP, calibration=calibration)
    assert (
        evaluate_cli(
            "--model", card, "--data", cache, "--out", tmp_path / "out", "--splits", "test"
        )
        == 0
    )
    predictions, metrics, report = read_outputs(tmp_path / "out")

    assert tuple(predictions[0]) == PREDICTION_FIELDS
    assert len(predictions) == 12 and {p["split"] for p in predictions} == {"test"}
    for p in predictions:
        assert p["called_covid19"] == str(int(float(p["p_covid19"]) >= 0.37))
        assert sum(float(p[f"p_{c}"]) for c in GLOBAL_CLASSES) == pytest.approx(1.0, abs=1e-5)

    weights = tmp_path / "run" / "round_001.safetensors"
    assert metrics["model"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert metrics["operating_point"] == STORED_OP
    assert metrics["operating_point_source"] == "model card round_001.card.json"
    assert metrics["n_scans"] == 12 and metrics["data"]["scans_per_class"]["covid19"] == 4
    assert metrics["data"]["cache_settings"] == {
        "size": 32,
        "fraction": 0.5,
        "normalize": "ai-corona",
        "lung_crop": False,  # a cache from before the options
        "lung_only": False,
    }
    for key in ("auc_covid", "sens_covid", "spec_covid", "accuracy", "kappa", "confusion_3x3"):
        assert set(metrics["metrics"][key]) == {"value", "ci", "n_valid"}
    assert metrics["curves"]["roc"]["band"]["tpr_low"]
    assert metrics["notes"] == []
    # The card's temperature is applied; the reliability before it is shown beside.
    assert metrics["calibration"]["temperature"] == 2.0
    assert set(metrics["calibration"]["before"]) == {"ece", "brier"}
    assert metrics["curves"]["calibration_before"]["count"] != []
    assert "10 equal-width bins, without the temperature" in report
    assert "10 equal-width bins, temperature 2" in report
    uncalibrated = _scores(tmp_path / "run" / "round_001.safetensors", cache)
    calibrated = np.array([[float(p[f"p_{c}"]) for c in GLOBAL_CLASSES] for p in predictions])
    order = {p["scan_id"]: i for i, p in enumerate(predictions)}
    for scan_id, probs in uncalibrated.items():
        expected = np.exp(np.log(probs) / 2.0)
        np.testing.assert_allclose(calibrated[order[scan_id]], expected / expected.sum(), atol=2e-6)

    assert not EXTERNAL_LINK.search(report)
    assert report.count("<svg") >= 2 and "ROC curve" in report
    assert report.count('alt="CAM of scan') == 6  # 3 correct, 3 wrong CAM overlays
    assert report.count('alt="slice of scan') == 6  # each beside its plain slice


def _scores(weights: Path, cache: Path) -> dict[str, np.ndarray]:
    """The uncalibrated probabilities of the test split's scans, by scan id."""
    loaded = load_checkpoint(weights)
    data = CacheDataset(cache, ["test"])
    result = evaluate(loaded.model, make_loader(data, 4), "cpu")
    return dict(zip(result.scan_ids, result.probs, strict=True))


def test_operating_point_is_chosen_on_the_tuning_data(tmp_path: Path, cache: Path) -> None:
    card = make_run(tmp_path / "run")
    out = tmp_path / "out"
    args = ("--model", card, "--data", cache, "--out", out, "--tune-data", cache)
    assert evaluate_cli(*args, "--splits", "test", "--rule", "youden") == 0
    _, metrics, _ = read_outputs(out)

    model = load_checkpoint(card).model
    tune = evaluate(model, make_loader(CacheDataset(cache, ["tune"]), 4), "cpu")
    expected = choose_operating_point(tune.labels, tune.probs, "youden")
    assert metrics["operating_point"]["threshold"] == pytest.approx(expected.threshold)
    assert metrics["operating_point"]["chosen_on"].startswith("tune split of cache")
    assert metrics["operating_point_source"] == "--tune-data"


def test_tuning_on_the_reported_scans_is_refused(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    card = make_run(tmp_path / "run")
    out = tmp_path / "out"
    assert evaluate_cli("--model", card, "--data", cache, "--out", out, "--tune-data", cache) == 2
    err = capsys.readouterr().err
    assert "also being reported" in " ".join(err.split()) and "Traceback" not in err
    assert not out.exists()


def test_untuned_threshold_and_assumed_settings_are_labelled(tmp_path: Path, cache: Path) -> None:
    card = make_run(tmp_path / "run", run_config={})
    assert (
        evaluate_cli("--model", card, "--data", cache, "--out", tmp_path / "out", "--cams", "0")
        == 0
    )
    predictions, metrics, report = read_outputs(tmp_path / "out")
    assert len(predictions) == 24
    assert metrics["operating_point"]["threshold"] == 0.5
    assert metrics["operating_point"]["chosen_on"] == UNTUNED
    assert metrics["operating_point_source"] == UNTUNED
    assert metrics["operating_point"]["sensitivity"] is None
    assert UNTUNED in report and "data:image/png" not in report
    assert any("PrepareConfig defaults assumed" in note for note in metrics["notes"])


def write_mosmed(root: Path, studies: int = 6) -> None:
    rng = np.random.default_rng(1)
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    for i in range(studies):
        folder = root / "studies" / ("CT-0" if i % 2 == 0 else "CT-2")
        folder.mkdir(parents=True, exist_ok=True)
        hu = rng.normal(-600 + 300 * (i % 2), 200, (32, 32, 12)).astype(np.int16)
        nib.save(nib.Nifti1Image(hu, affine), folder / f"study_{i + 1:04d}.nii.gz")


def test_raw_mosmed_folder_is_prepared_with_the_cards_settings(tmp_path: Path) -> None:
    write_mosmed(tmp_path / "mosmed")
    card = make_run(tmp_path / "run", operating_point=STORED_OP)
    args = ("--model", card, "--data", tmp_path / "mosmed", "--out", tmp_path / "out")
    assert evaluate_cli(*args, "--cams", "1") == 0
    predictions, metrics, report = read_outputs(tmp_path / "out")
    assert len(predictions) == 6
    assert {p["label"] for p in predictions} == {"normal", "covid19"}
    assert metrics["data"]["kind"] == "raw folder"
    assert metrics["data"]["cache_settings"] == {
        "size": 32,
        "fraction": 0.5,
        "normalize": "ai-corona",
        "lung_crop": False,  # a cache from before the options
        "lung_only": False,
    }
    assert "auc_ovr_pneumonia_or_abnormal" not in metrics["metrics"]
    assert not EXTERNAL_LINK.search(report) and "<svg" in report


def test_a_raw_folder_and_its_prepared_cache_give_the_same_intervals(tmp_path: Path) -> None:
    """Each preparation draws its own salt, so the patients' pseudonyms differ; the bootstrap
    must not depend on them."""
    write_mosmed(tmp_path / "mosmed", studies=12)
    card = make_run(tmp_path / "run", operating_point=STORED_OP)
    cfg = PrepareConfig(size=32, fraction=0.5, normalize="ai-corona", splits=(0.0, 0.0, 1.0))
    prepare(tmp_path / "mosmed", tmp_path / "cache", cfg, progress=False)
    reports = []
    for data in ("mosmed", "cache"):
        args = ("--model", card, "--data", tmp_path / data, "--out", tmp_path / f"out-{data}")
        assert evaluate_cli(*args, "--cams", "0", "--n-boot", "200") == 0
        reports.append(read_outputs(tmp_path / f"out-{data}")[1])
    raw, cached = reports
    assert raw["data"]["kind"] == "raw folder" and cached["data"]["kind"] == "cache"
    assert raw["metrics"] == cached["metrics"]
    assert raw["curves"]["roc"]["band"] == cached["curves"]["roc"]["band"]
    low, high = raw["metrics"]["auc_covid"]["ci"]
    assert low < high


def test_the_central_evaluations_interval_does_not_depend_on_the_salt(tmp_path: Path) -> None:
    """The coordinator's external cache, prepared twice (two salts): the same round gives
    the same AUC interval."""
    write_mosmed(tmp_path / "mosmed", studies=12)
    cfg = PrepareConfig(size=32, fraction=0.5, normalize="ai-corona", splits=(0.0, 0.0, 1.0))
    metrics = []
    for name in ("first", "second"):
        prepare(tmp_path / "mosmed", tmp_path / name, cfg, progress=False)
        evaluator = CentralEvaluator(
            GlobalModel(TINY, seed=0), {"m": tmp_path / name}, batch_size=2, device="cpu"
        )
        metrics.append(evaluator())
    assert (tmp_path / "first" / ".salt").read_text() != (tmp_path / "second" / ".salt").read_text()
    assert metrics[0] == metrics[1]
    assert metrics[0]["m-auc_covid_ci_low"] < metrics[0]["m-auc_covid_ci_high"]
    # Without the round's operating point the rates name their threshold; with it, they are
    # at it and it is recorded beside them.
    assert {"m-sens_covid_at_0.5", "m-spec_covid_at_0.5"} <= set(metrics[0])
    assert "m-sens_covid" not in metrics[0] and "m-threshold" not in metrics[0]
    at_point = evaluator(choose_operating_point(np.array([0, 2]), np.eye(3)[[0, 2]], "youden"))
    assert at_point["m-threshold"] == 1.0 and "m-sens_covid_at_0.5" not in at_point
    assert {"m-sens_covid", "m-spec_covid"} <= set(at_point)


def test_missing_prepare_settings_fall_back_to_defaults_and_say_so() -> None:
    settings, missing = prepare_settings_from_card({"run_config": {"image-size": 64}}, Path("c"))
    # A card from before lung-crop existed was trained without it, and needs no note.
    assert settings == {
        "size": 64,
        "fraction": 0.5,
        "normalize": "ai-corona",
        "lung_crop": False,
        "lung_only": False,
    }
    assert missing == ["fraction", "normalize"]
    with pytest.raises(CheckpointLoadError, match="lung-crop='yes' is invalid"):
        prepare_settings_from_card({"run_config": {"lung-crop": "yes"}}, Path("c"))


def test_digest_mismatch_is_a_clear_error(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    card = make_run(tmp_path / "run")
    content = json.loads(card.read_text())
    card.write_text(json.dumps({**content, "sha256": "0" * 64}))
    with pytest.raises(CheckpointLoadError, match="differs from"):
        load_checkpoint(tmp_path / "run" / "round_001.safetensors")
    assert evaluate_cli("--model", card, "--data", cache, "--out", tmp_path / "out") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "round_001.safetensors" in err and "sha256" in err and "Traceback" not in err


def test_a_weights_file_without_card_is_refused(tmp_path: Path) -> None:
    card = make_run(tmp_path / "run")
    card.unlink()
    with pytest.raises(CheckpointLoadError, match="model card not found"):
        load_checkpoint(tmp_path / "run" / "round_001.safetensors")
