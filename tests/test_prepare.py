"""``fedct prepare`` end to end on synthetic cohorts in every supported layout."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from fedct.common.cache.config import PrepareConfig
from fedct.common.cache.dataset import CacheDataset
from fedct.common.cache.prepare import prepare
from fedct.common.cache.store import CacheError, read_manifest
from fedct.common.cli import main
from fedct.common.synth.cohort import synthesize

TINY = PrepareConfig(size=32, min_slices=4, workers=2)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    synthesize(out, "tiny", sites=3, scans_per_site=6, seed=11, progress=False)
    return out


def _sites(cohort: Path) -> list[Path]:
    return sorted(p for p in (cohort / "sites").iterdir() if p.is_dir())


def test_every_dicom_site_prepares_with_labels(cohort: Path, tmp_path: Path) -> None:
    for site in _sites(cohort):
        cache = tmp_path / site.name
        result = prepare(site, cache, TINY, labels=site / "labels.csv", progress=False)
        labelled = {line.split(",")[1] for line in (site / "labels.csv").read_text().split()[1:]}
        assert len(result.rows) == len(labelled), [r.reason for r in result.rejections]
        assert {r.reason for r in result.rejections} <= {"localizer", "not-selected"}
        dataset = CacheDataset(cache)
        item = dataset[0]
        assert item.pixels.shape[1:] == (1, 32, 32)
        assert all(int(r["n_slices_selected"]) >= 1 for r in dataset.rows)
        qa = json.loads((cache / "qa.json").read_text())
        assert qa["scans"] == len(result.rows)
        assert (cache / "qa.html").read_text().startswith("<!doctype html>")


def test_mosmed_nifti_layout(cohort: Path, tmp_path: Path) -> None:
    cfg = PrepareConfig(size=32, min_slices=4, workers=1, splits=(0.0, 0.0, 1.0))
    result = prepare(cohort / "external" / "mosmed", tmp_path / "mosmed", cfg, progress=False)
    assert result.rows and not result.rejections
    rows = read_manifest(tmp_path / "mosmed")
    assert {r["split"] for r in rows} == {"test"}
    assert {r["global_class"] for r in rows} == {"normal", "covid19"}
    assert all(r["severity"].startswith("CT-") for r in rows)
    normal = [r for r in rows if r["severity"] == "CT-0"]
    assert all(r["global_class"] == "normal" for r in normal)


def test_ccccii_png_layout(cohort: Path, tmp_path: Path) -> None:
    result = prepare(cohort / "external" / "ccccii", tmp_path / "cc", TINY, progress=False)
    assert result.rows and not result.rejections
    assert {r["format"] for r in result.rows} == {"png"}
    assert {r["global_class"] for r in result.rows} <= {
        "normal",
        "pneumonia_or_abnormal",
        "covid19",
    }


def test_no_identifier_reaches_any_output(cohort: Path, tmp_path: Path, capfd) -> None:
    site = _sites(cohort)[0]
    cache = tmp_path / "cache"
    assert main(["prepare", "--input", str(site), "--out", str(cache), "--size", "32",
                 "--min-slices", "4", "--labels", str(site / "labels.csv")]) == 0  # fmt: skip
    secrets: set[str] = set()
    for path in site.rglob("*"):
        if path.is_file() and path.name not in ("labels.csv",):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except pydicom.errors.InvalidDicomError:
                continue
            secrets |= {str(ds.PatientName), ds.PatientID, ds.AccessionNumber}
            secrets |= {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
            secrets |= {p for p in path.relative_to(site).parts if len(p) > 3}
    secrets.discard("")
    assert secrets
    captured = capfd.readouterr()
    blobs = {"stdout": captured.out, "stderr": captured.err}
    for path in cache.rglob("*"):
        if path.is_file() and path.name != ".salt":
            blobs[str(path)] = path.read_bytes().decode("latin-1")
    for name, text in blobs.items():
        leaked = [s for s in secrets if s in text]
        assert not leaked, f"{name} contains {leaked[:3]}"


def test_rerun_reuses_and_refuses_other_settings(cohort: Path, tmp_path: Path) -> None:
    site = _sites(cohort)[1]
    cache = tmp_path / "cache"
    first = prepare(site, cache, TINY, labels=site / "labels.csv", progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in (cache / "scans").iterdir()}
    again = prepare(site, cache, TINY, labels=site / "labels.csv", progress=False)
    assert again.reused == len(first.rows)
    assert before == {p.name: p.stat().st_mtime_ns for p in (cache / "scans").iterdir()}
    assert [r["scan_id"] for r in again.rows] == [r["scan_id"] for r in first.rows]
    with pytest.raises(CacheError, match="size=32 \\(now 64\\)"):
        prepare(site, cache, PrepareConfig(size=64), labels=site / "labels.csv", progress=False)
    assert len(read_manifest(cache)) == len(first.rows)


def test_missing_labels_and_unknown_labels(cohort: Path, tmp_path: Path) -> None:
    site = _sites(cohort)[0]
    lines = (site / "labels.csv").read_text().splitlines()
    partial = tmp_path / "labels.csv"
    header, first_row, *rest = lines
    cols = header.split(",")
    odd = first_row.split(",")
    odd[cols.index("label")] = "mystery"
    partial.write_text("\n".join([header, ",".join(odd), *rest[: len(rest) // 2]]) + "\n")
    result = prepare(site, tmp_path / "c", TINY, labels=partial, progress=False)
    reasons = {r.reason for r in result.rejections}
    assert {"missing-label", "unknown-label"} <= reasons


def test_cli_exit_codes_and_clear_errors(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    assert main(["prepare", "--input", str(empty), "--out", str(tmp_path / "c")]) == 1
    assert main(["prepare", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "does not exist" in err and "Traceback" not in err
    assert main(["prepare", "--input", str(empty), "--out", str(tmp_path / "d"),
                 "--normalize", "bone"]) == 2  # fmt: skip
    assert "unknown normalisation" in capsys.readouterr().err


def test_pydicom_test_files_never_crash_prepare(tmp_path: Path) -> None:
    source = Path(pydicom.__file__).parent / "data" / "test_files"
    raw = tmp_path / "raw"
    shutil.copytree(source, raw)
    result = prepare(raw, tmp_path / "cache", PrepareConfig(size=16, min_slices=1), progress=False)
    files = [p for p in raw.rglob("*") if p.is_file()]
    assert len(result.rejections) > 0 and len(files) > 50
    for rejection in result.rejections:
        assert rejection.reason and rejection.path
    for row in result.rows:
        pixels = np.load(tmp_path / "cache" / "scans" / f"{row['scan_id']}.npy")
        assert pixels.dtype == np.uint8 and pixels.shape[1:] == (16, 16)


def test_splits_and_training_order_follow_the_data_not_the_salt(
    cohort: Path, tmp_path: Path
) -> None:
    """Two preparations of one site draw two salts, so every pseudonym differs; every scan,
    matched by its pixels, must still land in the same split, and a split's dataset must
    yield the same scans in the same order (so two fresh clones train alike)."""
    site = _sites(cohort)[0]
    split_by_pixels = []
    train_order = []
    cfg = replace(TINY, splits=(0.4, 0.3, 0.3))  # a few patients: more than one split
    for name in ("first", "second"):
        cache = tmp_path / name
        prepare(site, cache, cfg, labels=site / "labels.csv", progress=False)
        split_by_pixels.append(
            {
                np.load(cache / "scans" / f"{row['scan_id']}.npy").tobytes(): row["split"]
                for row in read_manifest(cache)
            }
        )
        train = CacheDataset(cache, ["train"])
        train_order.append([train[i].pixels.numpy().tobytes() for i in range(len(train))])
    first, second = split_by_pixels
    assert (tmp_path / "first" / ".salt").read_text() != (tmp_path / "second" / ".salt").read_text()
    assert first == second
    assert len(set(first.values())) > 1
    assert train_order[0] == train_order[1] and len(train_order[0]) > 1
