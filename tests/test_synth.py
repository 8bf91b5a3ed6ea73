"""The synthetic cohort generator: determinism, layouts, phantom HU and findings."""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from fedct.common.commands import synth
from fedct.common.synth import cohort
from fedct.common.synth.cohort import render_phantom, render_scan, synthesize
from fedct.common.synth.dicom_writer import SeriesSpec, make_uid, write_ct_series
from fedct.common.synth.findings import Difficulty, draw_lesions
from fedct.common.synth.hospitals import HOSPITALS
from fedct.common.synth.phantom import Grid, build_phantom, lung_fields, sample_anatomy

MID_GRID = Grid((40, 192, 192), (7.5, 1.9, 1.9))


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, cohort.CohortSummary]:
    out = tmp_path_factory.mktemp("tiny") / "cohort"
    return out, synthesize(out, "tiny", seed=0, progress=False, workers=2)


def test_same_seed_gives_the_same_bytes_with_one_writer_or_several(tiny, tmp_path: Path) -> None:
    out, _ = tiny
    again = tmp_path / "again"
    synthesize(again, "tiny", seed=0, progress=False, workers=1)
    first, second = tree(out), tree(again)
    assert sorted(first) == sorted(second)
    assert [k for k in first if first[k] != second[k]] == []


def run_cli(out: Path, *extra: str) -> int:
    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    argv = ["--out", str(out), "--profile", "tiny", "--sites", "1", "--scans-per-site", "2"]
    return synth.run(parser.parse_args([*argv, "--no-external", *extra]))


def test_cli_and_other_seed_differs(tmp_path: Path, capsys) -> None:
    assert run_cli(tmp_path / "s0") == 0
    assert "synthesized hospital-a" in capsys.readouterr().out
    assert run_cli(tmp_path / "s0") == 2  # never writes into a non-empty folder
    assert run_cli(tmp_path / "s1", "--seed", "1") == 0
    a, b = tree(tmp_path / "s0"), tree(tmp_path / "s1")
    assert set(a) != set(b)  # other patient IDs, UIDs, file names
    assert a["sites/hospital-a/labels.csv"] != b["sites/hospital-a/labels.csv"]


def read_labels(site: Path) -> list[dict[str, str]]:
    with (site / "labels.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["patient_id", "study_uid", "label"]
        return list(reader)


def test_site_layouts_and_labels(tiny) -> None:
    out, summary = tiny
    record = json.loads((out / "cohort.json").read_text())
    file_patterns = {
        "mdh-like": r"PID\d{6}/\d{8}_ACC\d{8}/\d{3}_[A-Z]+(_[\d.]+)*(_MPR)?/IM\d{4}\.dcm",
        "ccccii-like": r"DICOM/2\.25\.\d+\.dcm",
        "covid-ward": r"PID\d{6}/\d{8}_ACC\d{8}/\d{3}_[A-Z]+(_[\d.]+)*/IM\d{4}",
    }
    assert [s["profile"] for s in record["sites"].values()] == list(file_patterns)
    for name, site_record in record["sites"].items():
        site = out / "sites" / name
        labels = read_labels(site)
        hospital = next(h for h in HOSPITALS if h.name == site_record["profile"])
        assert {r["label"] for r in labels} == {label for label, _ in hospital.labels}
        assert len(labels) == site_record["studies"] == sum(summary.sites[name].values())
        files = [p for p in site.rglob("*") if p.is_file() and p.name != "labels.csv"]
        assert len(files) == site_record["files"]
        pattern = re.compile(file_patterns[site_record["profile"]])
        assert all(pattern.fullmatch(str(p.relative_to(site))) for p in files)
        found = set()
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            found.add((ds.PatientID, ds.StudyInstanceUID))
        assert found == {(r["patient_id"], r["study_uid"]) for r in labels}
        assert site_record["patients"] < len(labels)  # some patients come twice
    text = (out / "cohort.json").read_text()
    assert "PID" not in text and "^" not in text  # no identifiers in the summary


def test_dicom_headers_and_pixels(tiny) -> None:
    out, _ = tiny
    series = sorted((out / "sites" / "hospital-a").rglob("002_*"))[0]
    first = sorted(series.iterdir())[0]
    ds = pydicom.dcmread(first)
    for keyword in (
        "PatientName",
        "PatientID",
        "AccessionNumber",
        "StudyInstanceUID",
        "RescaleIntercept",
        "RescaleSlope",
        "PixelSpacing",
        "ImagePositionPatient",
    ):
        assert keyword in ds
    assert re.fullmatch(r"[A-Z]+\^[A-Z]+\^[A-Z]", str(ds.PatientName))
    assert ds.pixel_array.shape == (ds.Rows, ds.Columns) == (64, 64)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert hu.min() > -1100 and hu.max() > 200  # air around the body, bone inside


@pytest.mark.parametrize("hospital", HOSPITALS, ids=lambda h: h.name)
def test_scanner_storage_round_trips_hu(hospital, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    scanner = hospital.acquisition.scanners[0]
    hu = render_scan("covid", 2, rng, (4, 64, 64), (20.0, 5.5, 5.5), scanner=scanner)
    spec = SeriesSpec(
        "DOE^JANE^K",
        "PID483920",
        make_uid(rng),
        make_uid(rng),
        transfer_syntax=hospital.transfer_syntax,
    )
    paths = write_ct_series(tmp_path, hu, spec, scanner.storage, rng=rng)
    ds = pydicom.dcmread(paths[1])
    back = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    body = hu[1] > -1000
    assert np.abs(back[body] - hu[1][body]).max() <= float(ds.RescaleSlope) / 2 + 1e-3


def test_mosmed_layout(tiny) -> None:
    out, summary = tiny
    studies = out / "external" / "mosmed" / "studies"
    assert sorted(p.name for p in studies.iterdir()) == ["CT-0", "CT-1", "CT-2", "CT-3", "CT-4"]
    numbers = []
    for k in range(5):
        files = sorted((studies / f"CT-{k}").iterdir())
        assert len(files) == summary.external["mosmed"][f"CT-{k}"] >= 1
        assert all(re.fullmatch(r"study_\d{4}\.nii\.gz", p.name) for p in files)
        numbers += [int(p.name[6:10]) for p in files]
    assert numbers == list(range(1, len(numbers) + 1))  # continuous across the folders
    path = studies / "CT-1" / f"study_{numbers[summary.external['mosmed']['CT-0']]:04d}.nii.gz"
    assert path.read_bytes()[4:8] == b"\0\0\0\0"  # gzip mtime
    image = nib.load(path)
    assert image.get_data_dtype() == np.int16
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")  # axial slices on the last axis
    assert image.shape[:2] == (64, 64) and 12 <= image.shape[2] <= 16
    data = np.asarray(image.dataobj)
    assert data.min() >= -1024 and data.max() > 200


def test_ccccii_layout(tiny) -> None:
    out, summary = tiny
    root = out / "external" / "ccccii"
    assert sorted(p.name for p in root.iterdir()) == ["CP", "NCP", "Normal"]
    scans = [s for cls in root.iterdir() for patient in cls.iterdir() for s in patient.iterdir()]
    assert len(scans) == sum(summary.external["ccccii"].values())
    for scan in scans:
        assert scan.parent.name.isdigit() and scan.name.isdigit()
        names = [p.name for p in scan.iterdir()]
        assert set(names) == {f"{n}.png" for n in range(len(names))}
        assert len(names) > 10 and sorted(names) != sorted(names, key=lambda n: int(n[:-4]))


@pytest.fixture(scope="module")
def normal_phantom():
    rng = np.random.default_rng(11)
    anatomy = sample_anatomy(rng, MID_GRID)
    return build_phantom(anatomy, MID_GRID, rng)


def test_phantom_hounsfield_units(normal_phantom) -> None:
    ph, an = normal_phantom, normal_phantom.anatomy
    z, y, x = (a.ravel() for a in MID_GRID.axes())

    def at(xm: float, ym: float, zm: float) -> float:
        k, i, j = (int(np.argmin(np.abs(axis - v))) for axis, v in ((z, zm), (y, ym), (x, xm)))
        return float(ph.hu[k, i, j])

    assert abs(ph.hu[ph.lung > 0.99].mean() + 850) < 60
    z_mid = (an.z_apex + an.z_base) / 2 + 20
    assert -130 < at(an.body_a - an.fat / 2, an.body_y, z_mid) < -60  # subcutaneous fat
    assert 20 < at(an.body_a - an.fat - 2, an.body_y, z_mid) < 80  # muscle
    assert 20 < at(*an.heart[:3]) < 70  # blood
    assert at(0.0, an.body_y - an.body_b[0] - 15, z_mid) == -1000  # air in front of the chest
    assert at(-0.5 * an.cav_a, an.body_y, an.z_base - 20) > 40  # liver under the right dome
    assert ph.hu[ph.bone].mean() > 300


def test_lungs_shrink_towards_the_scan_ends(normal_phantom) -> None:
    area = normal_phantom.lung.sum(axis=(1, 2))
    n = len(area)
    centre, ends = area[n // 4 : 3 * n // 4].mean(), np.r_[area[: n // 8], area[-n // 8 :]].mean()
    assert centre > 3 * ends


def covid_phantom(severity: int, seed: int = 5):
    rng = np.random.default_rng(seed)
    difficulty = Difficulty(atypical_covid=0.0, faint_covid=0.0, lesion_contrast=1.0)
    return render_phantom("covid", severity, rng, MID_GRID, difficulty)


def test_covid_lesions_are_peripheral_posterior_and_lower() -> None:
    for seed in range(3):
        rng = np.random.default_rng(seed)
        anatomy = sample_anatomy(rng, MID_GRID)
        difficulty = Difficulty(atypical_covid=0.0)
        lesions = draw_lesions("covid", 2, rng, anatomy, MID_GRID, difficulty)
        fields = lung_fields(anatomy, MID_GRID.coarse())
        lesion = lesions.opacity * fields.fraction
        lung = np.broadcast_to(fields.fraction, lesion.shape)
        for name in ("peripheral", "posterior", "lower"):
            where = np.broadcast_to(getattr(fields, name), lesion.shape)
            in_lesions = (where * lesion).sum() / lesion.sum()
            in_lung = (where * lung).sum() / lung.sum()
            assert in_lesions > in_lung + 0.05, name


def test_covid_severity_raises_lung_density() -> None:
    means = []
    for severity in (1, 2, 3, 4):
        ph = covid_phantom(severity)
        means.append(ph.hu[ph.lung > 0.99].mean())
    assert means == sorted(means) and means[-1] > means[0] + 150


def test_pneumonia_is_denser_than_ground_glass() -> None:
    ggo = covid_phantom(1)
    rng = np.random.default_rng(5)
    pneumonia = render_phantom("cp", 3, rng, MID_GRID, Difficulty(lesion_contrast=1.0))
    ggo_hu = ggo.hu[(ggo.opacity > 0.15) & (ggo.opacity < 0.5) & (ggo.lung > 0.99)].mean()
    core = pneumonia.hu[(pneumonia.opacity > 0.8) & (pneumonia.lung > 0.99)]
    assert -750 < ggo_hu < -300
    assert core.mean() > -150 and core.mean() > ggo_hu + 300


def test_difficulty_and_kind_are_checked() -> None:
    with pytest.raises(ValueError):
        Difficulty(faint_covid=1.5)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        render_scan("covid", 0, rng, (12, 64, 64), (25.0, 5.5, 5.5))
    with pytest.raises(ValueError):
        render_scan("flu", 1, rng, (12, 64, 64), (25.0, 5.5, 5.5))  # type: ignore[arg-type]


def test_full_size_series_renders_and_writes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    hu = render_scan("covid", 2, rng, (60, 512, 512), (5.0, 0.7, 0.7))
    spec = SeriesSpec("DOE^JANE^K", "PID483920", make_uid(rng), make_uid(rng))
    paths = write_ct_series(
        tmp_path, hu, spec, HOSPITALS[0].acquisition.scanners[0].storage, rng=rng
    )
    assert len(paths) == 60
    assert hu.shape == (60, 512, 512) and hu.dtype == np.float32
