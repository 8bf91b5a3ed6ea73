"""``fedct diagnose`` on tiny unlabelled studies, and ``fedct evaluate`` on the same ones."""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from study_files import PATIENT_NAME, write_one_slice_nifti, write_study, zip_folder
from test_evaluate import STORED_OP, evaluate_cli, make_run

import fedct.common.model.inference_engine as engine
from fedct.client import commands
from fedct.client.evaluator.diagnose import run
from fedct.client.evaluator.study_input import InputError, Limits, unpack_zip
from fedct.common.classes import GLOBAL_CLASSES

CALIBRATION = {"temperature": 2.0, "grid": [1.0, 2.0], "chosen_on": "tune splits, 9 scans"}


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A DICOM export of three studies (one with a localizer beside its axial series, one
    with only a localizer) and a stray file, and a run whose card stores an operating point
    and a calibration temperature."""
    root = tmp_path_factory.mktemp("diagnose")
    rng = np.random.default_rng(0)
    raw = root / "raw"
    clear = write_study(raw / "patient-a", rng, opacity=0.0, localizer=True)
    hazy = write_study(raw / "patient-b", rng, opacity=0.6)
    scout_only = write_study(raw / "patient-c", rng, slices=1, localizer=True)
    (raw / "patient-c" / "axial" / "IM0001.dcm").unlink()  # leaves the localizer alone
    (raw / "notes.txt").write_text("not an image")
    return {
        "root": root,
        "raw": raw,
        "card": make_run(root / "run", operating_point=STORED_OP, calibration=CALIBRATION),
        "uids": {"patient-a": clear, "patient-b": hazy, "patient-c": scout_only},
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The backbone's exports, shared by the module's tests (one export per model)."""
    return tmp_path_factory.mktemp("exported")


@pytest.fixture(autouse=True)
def private_temp(tmp_path: Path, exported: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every temporary file in a folder of the test's own, the backbone's exports apart."""
    folder = tmp_path / "system-temp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setattr(engine, "DEFAULT_CACHE", exported)
    return folder


def diagnose_cli(*argv: object) -> int:
    parser = argparse.ArgumentParser()
    commands.diagnose.add_arguments(parser)
    base = ["--device", "cpu", "--workers", "1"]
    return run(parser.parse_args([*base, *(str(a) for a in argv)]))


def read_diagnoses(out: Path) -> dict[str, Any]:
    return json.loads((out / "diagnoses.json").read_text())


def test_every_study_gets_a_result_or_a_reason_and_identifiers_stay_in_out(
    studies: dict[str, Any], tmp_path: Path, private_temp: Path
) -> None:
    out = tmp_path / "out"
    assert diagnose_cli("--model", studies["card"], "--input", studies["raw"], "--out", out) == 0
    document = read_diagnoses(out)
    by_source = {s["source"]: s for s in document["studies"]}
    assert sorted(by_source) == ["patient-a/axial", "patient-b/axial", "patient-c/scout"]
    for name in ("patient-a/axial", "patient-b/axial"):
        study = by_source[name]
        assert study["status"] == "diagnosed"
        assert study["study"] == studies["uids"][name.split("/")[0]]
        assert sum(study["probabilities"].values()) == pytest.approx(1.0)
        assert set(study["probabilities"]) == set(GLOBAL_CLASSES)
        decision = study["decision"]
        assert decision["threshold"] == STORED_OP["threshold"]
        assert decision["tune_sensitivity"] == STORED_OP["sensitivity"]
        assert decision["called_covid19"] == (
            study["probabilities"]["covid19"] >= STORED_OP["threshold"]
        )
        assert study["slices"]["count"] == 6  # the middle 50 % of 12 slices
        assert study["slices"]["lungs_outlined"]  # prepare stores every scan's lung mask
        for picture in study["slices"]["plain"] + study["slices"]["evidence"]:
            assert (out / "studies" / picture).is_file()
        assert (out / study["page"]).is_file()
    with_scout = by_source["patient-a/axial"]
    assert with_scout["series"]["why"] == "the study's only usable axial CT series"
    assert [r["reason"] for r in with_scout["rejected"]] == ["localizer"]
    assert any(w.startswith("few slices") for w in with_scout["qa"])
    scout_only = by_source["patient-c/scout"]
    assert scout_only["status"] == "not diagnosed" and "localizer" in scout_only["reason"]
    assert [r["reason"] for r in document["unassigned"]] == ["not-dicom"]
    assert document["model"]["sha256"] and document["model"]["round"] == 1

    with open(out / "diagnoses.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["status"] for r in rows] == ["diagnosed", "diagnosed", "not diagnosed"]
    index = (out / "index.html").read_text()
    assert all(s["page"] in index for s in document["studies"])
    assert not (out / ".work").exists()
    # The patient's identifiers went into --out alone: nothing else was written.
    assert not any(private_temp.iterdir())
    assert PATIENT_NAME not in json.dumps(document)  # names are never copied, only UIDs

    again = diagnose_cli("--model", studies["card"], "--input", studies["raw"], "--out", out)
    assert again == 2  # an earlier result is replaced only with --force


def test_diagnose_and_evaluate_give_a_scan_the_same_probabilities(
    studies: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through the same preparation and scoring (OpenVINO where installed) at the card's
    temperature, and evaluate names each study's source and StudyInstanceUID in
    predictions.csv."""
    card, raw = studies["card"], studies["raw"]
    assert diagnose_cli("--model", card, "--input", raw, "--out", tmp_path / "d") == 0
    assert evaluate_cli("--model", card, "--data", raw, "--out", tmp_path / "e") == 0
    assert "no metrics without labels" in capsys.readouterr().out
    with open(tmp_path / "e" / "predictions.csv", newline="") as handle:
        predictions = {row["study_uid"]: row for row in csv.DictReader(handle)}
    assert not (tmp_path / "e" / "metrics.json").exists()
    diagnosed = [s for s in read_diagnoses(tmp_path / "d")["studies"] if s["probabilities"]]
    assert {s["study"] for s in diagnosed} == set(predictions)
    for study in diagnosed:
        row = predictions[study["study"]]
        assert row["source"] == study["source"] and row["label"] == ""
        for name in GLOBAL_CLASSES:
            assert float(row[f"p_{name}"]) == pytest.approx(study["probabilities"][name], abs=2e-6)


def test_a_zip_gives_what_its_folder_gives(studies: dict[str, Any], tmp_path: Path) -> None:
    archive = zip_folder(studies["raw"] / "patient-b", tmp_path / "study.zip")
    assert (
        diagnose_cli("--model", studies["card"], "--input", archive, "--out", tmp_path / "z") == 0
    )
    (study,) = read_diagnoses(tmp_path / "z")["studies"]
    assert study["study"] == studies["uids"]["patient-b"] and study["source"] == "axial"


def test_a_one_slice_file_gets_its_real_reason(
    studies: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nifti = write_one_slice_nifti(tmp_path / "single" / "scan.nii.gz")
    out = tmp_path / "out"
    assert diagnose_cli("--model", studies["card"], "--input", nifti, "--out", out) == 1
    (study,) = read_diagnoses(out)["studies"]
    assert study["study"] == "scan.nii.gz" and study["status"] == "not diagnosed"
    assert "too-few-slices" in study["reason"]
    assert "study 1: not diagnosed (too-few-slices)" in capsys.readouterr().out

    args = ("--model", studies["card"], "--data", nifti.parent, "--out", tmp_path / "e")
    assert evaluate_cli(*args) == 2
    assert "scan.nii.gz: too-few-slices (1 < 10)" in capsys.readouterr().err


def test_a_broken_or_unsafe_zip_is_one_line(
    studies: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK\x03\x04 this is not a zip")
    assert diagnose_cli("--model", studies["card"], "--input", broken, "--out", tmp_path / "o") == 2
    assert "broken.zip: not a readable zip file" in capsys.readouterr().err

    unsafe = tmp_path / "unsafe.zip"
    with zipfile.ZipFile(unsafe, "w") as zipped:
        zipped.writestr("../outside.dcm", b"x")
    with pytest.raises(InputError, match="would land outside"):
        unpack_zip(unsafe, tmp_path / "u")
    assert not (tmp_path / "outside.dcm").exists()

    many = zip_folder(studies["raw"] / "patient-a", tmp_path / "many.zip")
    with pytest.raises(InputError, match="more than the 3 allowed"):
        unpack_zip(many, tmp_path / "m", Limits(max_files=3))
    with pytest.raises(InputError, match="unpacks to"):
        unpack_zip(many, tmp_path / "b", Limits(max_bytes=1000))
