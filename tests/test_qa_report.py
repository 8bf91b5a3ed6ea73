"""The cache QA report: every input file accounted for, rejections traceable to their files
through ``fedct inspect --cache``, the labels file not rejected, the report's sections."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
from page_parts import Page

from fedct.common.cli import main
from fedct.common.synth.cohort import synthesize


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny DICOM site (localizers, second series, labels.csv) plus a stray text file
    and a DICOMDIR."""
    out = tmp_path_factory.mktemp("qa-cohort")
    synthesize(out, "tiny", sites=1, scans_per_site=4, seed=5, external=False, progress=False)
    site = out / "sites" / "hospital-a"
    (site / "notes.txt").write_text("the export's readme\n")
    dicomdir = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "DICOMDIR"
    shutil.copy(dicomdir, site / "DICOMDIR")
    return site


def _all_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _inspect(capsys: pytest.CaptureFixture[str], *argv: object) -> dict:
    capsys.readouterr()
    assert main(["inspect", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_every_file_is_accounted_for_and_each_rejection_leads_to_its_files(
    site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    argv = ["prepare", "--input", site, "--out", cache, "--labels", site / "labels.csv"]
    assert main([*map(str, argv), "--size", "32", "--workers", "1"]) == 0
    done = capsys.readouterr()
    assert "prepared 4 scans" in done.out and "warning" not in done.err
    qa = json.loads((cache / "qa.json").read_text())
    files = _all_files(site)
    assert qa["files"]["read"] == len(files)
    assert qa["files"]["ignored"] == 2  # labels.csv and the DICOMDIR
    assert {i["what"].split(" (")[0] for i in qa["ignored"]} == {
        "the site's labels file",
        "DICOMDIR index of the export",
    }
    assert qa["rejected_by_reason"]["not-dicom"] == 1  # notes.txt, not labels.csv
    assert "notes" not in json.dumps(qa) and str(site) not in (cache / "qa.html").read_text()

    seen = _inspect(capsys, site, "--cache", cache)
    listed = [f for s in seen["scans"] for f in s["files"]]
    listed += [f for r in seen["rejected"] for f in r["files"]] + [
        i["path"] for i in seen["ignored"]
    ]
    assert sorted(listed) == files and seen["files"]["read"] == len(files)
    by_id = {r["qa_id"]: r for r in seen["rejected"]}
    for row in qa["rejected"]:
        assert by_id[row["id"]]["reason"] == row["reason"]
        assert len(by_id[row["id"]]["files"]) == row["files"]
    assert {i["qa_id"] for i in seen["ignored"]} == {i["id"] for i in qa["ignored"]}
    not_selected = [r for r in seen["rejected"] if r["reason"] == "not-selected"]
    assert not_selected and all(len(r["files"]) > 1 for r in not_selected)
    assert "qa_id" not in _inspect(capsys, site)["rejected"][0]


def test_prepare_without_labels_warns_and_keeps_labels_csv_out_of_the_rejections(
    site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "unlabelled"
    assert main(["prepare", "--input", str(site), "--out", str(cache), "--size", "32"]) == 0
    err = capsys.readouterr().err
    assert "warning: no --labels was given" in err and "all scans" in err
    assert f"pass --labels {site / 'labels.csv'}" in err
    qa = json.loads((cache / "qa.json").read_text())
    assert qa["counts"]["unlabelled"]["train"] + qa["counts"]["unlabelled"]["test"] > 0
    assert qa["rejected_by_reason"].get("not-dicom") == 1
    assert any(i["what"].startswith("the site's labels file") for i in qa["ignored"])


def test_qa_page_shows_samples_hu_scanners_and_collapsed_rejections(
    site: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "page"
    argv = ["prepare", "--input", site, "--out", cache, "--labels", site / "labels.csv"]
    assert main([*map(str, argv), "--size", "32", "--workers", "1"]) == 0
    qa = json.loads((cache / "qa.json").read_text())
    page = Page((cache / "qa.html").read_text())
    assert page.sections == [
        "Scans per class and split",
        "Slices of one scan per class",
        "Lung masks",
        "Hounsfield units per class",
        "Scanners and spacing",
        "Slices per scan (before selection)",
        "Slice thickness (mm)",
        "Warnings",
        "Rejected and ignored inputs",
    ]
    classes = [s["class"] for s in qa["samples"]]
    assert classes and len(classes) == len(set(classes))
    thumbnails = [alt for alt in page.images if alt.startswith("slice ")]
    assert len(thumbnails) == sum(len(s["shown_slices"]) for s in qa["samples"])
    for sample in qa["samples"]:
        start, stop = sample["selected"]
        assert (
            sample["shown_slices"][0] == 0 and sample["shown_slices"][-1] == sample["n_slices"] - 1
        )
        assert {start, stop - 1} <= set(sample["shown_slices"])
    assert qa["lung_masks"]["measured"] == qa["scans"]
    assert sum(qa["lung_masks"]["share_histogram"].values()) == qa["scans"]
    assert set(qa["hu_histogram"]["per_class"]) == set(classes)
    assert sum(qa["hu_histogram"]["per_class"][classes[0]]) > 0
    scanners = page.table_with("scanner")
    assert sum(int(row[-1]) for row in scanners[1:]) == qa["scans"]
    assert [s.split(" — ")[0] for s in page.summaries] == [*qa["rejected_by_reason"], "ignored"]
    overview = dict(row for row in page.tables[0] if len(row) == 2)
    assert overview["normalisation"] == "ai-corona" and overview["slice size (pixels)"] == "32"
