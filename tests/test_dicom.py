"""The synthetic CT DICOM writer and the DICOM reader (fedct.common.ingest.dicom)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.encaps import encapsulate

from fedct.common.ingest import dicom as dicom_reader
from fedct.common.ingest.base import REASONS, Ignored, Rejection, Scan, ScanLoadError
from fedct.common.ingest.dicom import SeriesRule, read_dicom
from fedct.common.ingest.discover import files_of, read_input
from fedct.common.synth.dicom_writer import (
    ScannerProfile,
    SeriesSpec,
    make_uid,
    write_ct_series,
    write_localizer,
)


def phantom(n_slices: int = 6, size: int = 32, seed: int = 0) -> np.ndarray:
    """A body disc of soft tissue and lung in air, with noise; slice k differs from slice k+1."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    body = yy**2 + xx**2 < (0.4 * size) ** 2
    hu = np.where(body, 40.0, -1024.0)[None].repeat(n_slices, 0)
    hu[:, body] += rng.normal(0, 30, (n_slices, int(body.sum())))
    hu[:, size // 2, size // 3] = -850 + 10 * np.arange(n_slices)  # a slice fingerprint
    return hu


def spec_for(rng: np.random.Generator, **kw: object) -> SeriesSpec:
    base = {
        "patient_name": "DOE^JANE",
        "patient_id": "PID-1",
        "study_uid": make_uid(rng),
        "series_uid": make_uid(rng),
    }
    return SeriesSpec(**(base | kw))


def stored_to_hu(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


@pytest.mark.parametrize("syntax", ["explicit", "implicit", "rle"])
def test_writer_is_deterministic_and_complete(tmp_path: Path, syntax: str) -> None:
    hu = phantom()
    spec = spec_for(np.random.default_rng(1), transfer_syntax=syntax, naming="no-extension")
    first = write_ct_series(
        tmp_path / "a", hu, spec, ScannerProfile(), rng=np.random.default_rng(2)
    )
    again = write_ct_series(
        tmp_path / "b", hu, spec, ScannerProfile(), rng=np.random.default_rng(2)
    )
    assert [p.name for p in first] == [f"IM{i:04d}" for i in range(1, 7)]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, again, strict=True))

    ds = pydicom.dcmread(first[2])
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.InstanceNumber == 3 and ds.Modality == "CT"
    assert [float(v) for v in ds.ImagePositionPatient] == [-175.0, -175.0, -290.0]
    assert float(ds.SliceLocation) == -290.0 and ds.RescaleType == "HU"
    for keyword in ("FrameOfReferenceUID", "PatientBirthDate", "ConvolutionKernel", "KVP"):
        assert keyword in ds
    assert np.array_equal(stored_to_hu(first[2]), np.rint(hu[2]))


def test_writer_storage_variants(tmp_path: Path) -> None:
    hu = phantom()
    scanner = ScannerProfile(signed=False, rescale_slope=0.5, pixel_padding_value=65535)
    spec = spec_for(np.random.default_rng(3), naming="uid")
    paths = write_ct_series(tmp_path, hu, spec, scanner, rng=np.random.default_rng(4))
    ds = pydicom.dcmread(paths[0])
    assert paths[0].name == f"{ds.SOPInstanceUID}.dcm"
    assert ds.PixelRepresentation == 0 and ds.PixelPaddingValue == 65535
    assert ds.pixel_array[0, 0] == 65535  # the corner lies outside the scan circle
    inside = ds.pixel_array != 65535
    assert np.abs(stored_to_hu(paths[0])[inside] - hu[0][inside]).max() <= 0.25


def test_localizer_is_coronal_scout(tmp_path: Path) -> None:
    spec = spec_for(np.random.default_rng(5), series_number=99)
    path = write_localizer(
        tmp_path, phantom(1)[0], spec, ScannerProfile(), rng=np.random.default_rng(6)
    )
    ds = pydicom.dcmread(path)
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 0, -1]


def test_writer_never_overwrites(tmp_path: Path) -> None:
    spec = spec_for(np.random.default_rng(7))
    write_ct_series(tmp_path, phantom(2), spec, ScannerProfile(), rng=np.random.default_rng(8))
    with pytest.raises(FileExistsError):
        write_ct_series(tmp_path, phantom(2), spec, ScannerProfile(), rng=np.random.default_rng(8))


# --- the reader ---------------------------------------------------------------------------

PLAIN = ScannerProfile()


def write_series(
    out_dir: Path,
    hu: np.ndarray,
    *,
    seed: int,
    scanner: ScannerProfile = PLAIN,
    **kw: object,
) -> tuple[SeriesSpec, list[Path]]:
    rng = np.random.default_rng(seed)
    spec = spec_for(rng, **kw)
    return spec, write_ct_series(out_dir, hu, spec, scanner, rng=rng)


def read_all(root: Path, **kw: object) -> tuple[list[Scan], list[Rejection]]:
    """Scans and rejections of the DICOM reader (ignored DICOMDIRs left out)."""
    items = list(read_dicom(root, **kw))
    return [i for i in items if isinstance(i, Scan)], [i for i in items if isinstance(i, Rejection)]


def sop_uids(paths: list[Path]) -> tuple[str, ...]:
    return tuple(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths)


def edit(path: Path, **values: object) -> None:
    """Rewrite header values of a written file (SOPInstanceUID kept in step with the meta)."""
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)


ROUND_TRIPS = [
    ("explicit", ScannerProfile()),
    ("implicit", ScannerProfile(signed=False)),
    ("rle", ScannerProfile(signed=False, rescale_slope=0.5)),
    ("explicit", ScannerProfile(rescale_slope=2.0, rescale_intercept=0.0)),
    ("implicit", ScannerProfile(pixel_padding_value=-2000)),
    ("rle", ScannerProfile(signed=False, pixel_padding_value=65535)),
]


@pytest.mark.parametrize(("syntax", "scanner"), ROUND_TRIPS)
def test_round_trip_gives_hounsfield_units(
    tmp_path: Path, syntax: str, scanner: ScannerProfile
) -> None:
    hu = phantom()
    spec, paths = write_series(
        tmp_path / "ser", hu, seed=10, scanner=scanner, transfer_syntax=syntax
    )
    [scan], rejections = read_all(tmp_path)
    assert rejections == []
    assert (scan.source, scan.n_slices, scan.format, scan.intensity) == ("ser", 6, "dicom", "hu")
    assert (scan.patient_key, scan.study_key, scan.series_key) == (
        spec.patient_id,
        spec.study_uid,
        spec.series_uid,
    )
    assert scan.spacing_mm == (5.0, 0.7, 0.7) and scan.thickness_mm == 5.0
    assert scan.instance_uids == sop_uids(paths) and scan.warnings == ()
    slope, intercept = scanner.rescale_slope, scanner.rescale_intercept
    expected = np.rint((hu - intercept) / slope) * slope + intercept
    volume = scan.load(0, 6)
    assert volume.dtype == np.float32 and volume.shape == hu.shape
    # Padded air reads back as exactly -1024 HU; everything else to the slope's quantisation.
    assert np.allclose(volume, np.maximum(expected, -1024.0), atol=1e-3)
    assert np.abs(volume - hu).max() <= slope / 2 + 1e-3


def scramble(paths: list[Path], folder: Path, names: list[str]) -> None:
    """Move ``paths`` into ``folder`` under ``names`` (misleading: not in slice order)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path, name in zip(paths, names, strict=True):
        path.rename(folder / name)


def test_slices_sort_by_position_not_by_name(tmp_path: Path) -> None:
    hu = phantom(8)
    _, paths = write_series(tmp_path / "written", hu, seed=11)
    expected = sop_uids(paths)
    # The most inferior slice gets the highest number, and a misleading trailing digit.
    scramble(paths, tmp_path / "in" / "ser", [f"{8 - i:03d}_{(i * 5) % 8}" for i in range(8)])
    [scan], rejections = read_all(tmp_path / "in")
    assert rejections == [] and scan.instance_uids == expected
    assert np.array_equal(scan.load(0, 8), np.rint(hu))


def test_matches_simpleitk_order_and_values(tmp_path: Path) -> None:
    hu = phantom(7, seed=3)
    scanner = ScannerProfile(signed=False, rescale_slope=0.5)
    _, paths = write_series(tmp_path / "w", hu, seed=12, scanner=scanner, naming="uid")
    scramble(paths, tmp_path / "ser", [f"x{(i * 3) % 7}.dcm" for i in range(7)])
    [scan], _ = read_all(tmp_path)
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(tmp_path / "ser"))
    reader.SetFileNames(names)
    reference = sitk.GetArrayFromImage(reader.Execute())
    assert scan.instance_uids == sop_uids([Path(n) for n in names])
    assert np.allclose(scan.load(0, 7), reference, atol=1e-3)


def test_series_choice_in_a_study(tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    study = make_uid(rng)
    base = {"patient_name": "A^B", "patient_id": "P7", "study_uid": study}
    thick = SeriesSpec(series_uid=make_uid(rng), series_number=2, **base)
    thin = SeriesSpec(
        series_uid=make_uid(rng),
        series_number=3,
        spacing_mm=(2.5, 0.7, 0.7),
        thickness_mm=2.5,
        **base,
    )
    scout = SeriesSpec(series_uid=make_uid(rng), series_number=1, **base)
    study_dir = tmp_path / "P7" / "study"
    write_ct_series(study_dir / "s2", phantom(4), thick, ScannerProfile(), rng=rng)
    write_ct_series(study_dir / "s3", phantom(8), thin, ScannerProfile(kernel="B70f"), rng=rng)
    write_localizer(study_dir / "s1", phantom(1)[0], scout, ScannerProfile(), rng=rng)

    [scan], rejections = read_all(tmp_path)
    assert (scan.series_key, scan.n_slices, scan.spacing_mm[0]) == (thin.series_uid, 8, 2.5)
    assert sorted((r.path, r.reason) for r in rejections) == [
        ("P7/study/s1", "localizer"),
        ("P7/study/s2", "not-selected"),
    ]
    [scan], _ = read_all(tmp_path, rule=SeriesRule(prefer_thickness_mm=5.0))
    assert scan.series_key == thick.series_uid
    [scan], _ = read_all(tmp_path, rule=SeriesRule(prefer_kernel="standard"))
    assert scan.series_key == thick.series_uid
    scans, rejections = read_all(tmp_path, rule=SeriesRule(one_series_per_study=False))
    assert len(scans) == 2 and [r.reason for r in rejections] == ["localizer"]


def test_flat_dump_of_two_studies_without_extensions(tmp_path: Path) -> None:
    flat = tmp_path / "dump"
    specs, expected = [], {}
    for k, n in enumerate((5, 3)):
        spec, paths = write_series(
            tmp_path / f"w{k}", phantom(n), seed=20 + k, naming="no-extension"
        )
        specs.append(spec)
        expected[spec.study_uid] = sop_uids(paths)
        scramble(paths, flat, [f"{k}{(i * 7) % 10:05d}" for i in range(n)])
    scans, rejections = read_all(flat)
    assert rejections == []
    assert {s.study_key: s.instance_uids for s in scans} == expected
    assert {s.source for s in scans} == {"000000", "100000"}  # the first file of each series


def test_duplicate_files_and_positions(tmp_path: Path) -> None:
    _, paths = write_series(tmp_path / "dup" / "ser", phantom(4), seed=30)
    (paths[0].parent / "copy_of_IM0002").write_bytes(paths[1].read_bytes())
    [scan], rejections = read_all(tmp_path / "dup")
    assert rejections == [] and scan.n_slices == 4 and scan.warnings == ("duplicate-instance",)

    _, paths = write_series(tmp_path / "rep" / "ser", phantom(4), seed=31)
    edit(paths[2], ImagePositionPatient=[-175.0, -175.0, -295.0], SliceLocation=-295.0)
    scans, [rejection] = read_all(tmp_path / "rep")
    assert scans == [] and (rejection.path, rejection.reason) == ("ser", "inconsistent-geometry")
    assert "repeat a position" in rejection.detail

    _, paths = write_series(tmp_path / "size" / "ser", phantom(3), seed=32)
    write_ct_series(
        tmp_path / "size" / "ser" / "big",
        phantom(1, size=40),
        pydicom_spec_of(paths[0]),
        ScannerProfile(),
        rng=np.random.default_rng(33),
    )
    scans, [rejection] = read_all(tmp_path / "size")
    assert rejection.reason == "inconsistent-geometry" and "sizes differ" in rejection.detail


def pydicom_spec_of(path: Path) -> SeriesSpec:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return SeriesSpec("X^Y", str(ds.PatientID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))


def test_irregular_spacing_is_kept_with_a_warning(tmp_path: Path) -> None:
    _, paths = write_series(tmp_path / "ser", phantom(6), seed=40)
    paths[3].unlink()  # a missing slice leaves a 10 mm gap among 5 mm steps
    [scan], rejections = read_all(tmp_path)
    assert rejections == [] and scan.n_slices == 5
    assert scan.warnings == ("irregular-spacing",) and scan.spacing_mm[0] == 5.0


def test_instance_numbers_order_slices_only_without_positions(tmp_path: Path) -> None:
    hu = phantom(5)
    _, paths = write_series(tmp_path / "w", hu, seed=45)
    expected = sop_uids(paths)
    for path in paths:
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient
        ds.save_as(path)
    scramble(paths, tmp_path / "in" / "ser", ["e", "a", "d", "b", "c"])
    [scan], _ = read_all(tmp_path / "in")
    assert scan.instance_uids == expected and scan.warnings == ("no-positions",)
    assert scan.spacing_mm[0] == 5.0 and np.array_equal(scan.load(0, 5), np.rint(hu))


def test_oblique_and_sagittal_series_are_not_axial(tmp_path: Path) -> None:
    _, paths = write_series(tmp_path / "sag", phantom(2), seed=46)
    for path in paths:
        edit(path, ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    _, paths = write_series(tmp_path / "tilt", phantom(2), seed=47)
    tilt = np.radians(8)  # within the default 10 degrees
    for path in paths:
        edit(path, ImageOrientationPatient=[1, 0, 0, 0, np.cos(tilt), np.sin(tilt)])
    scans, rejections = read_all(tmp_path)
    assert [s.source for s in scans] == ["tilt"]
    assert [(r.path, r.reason) for r in rejections] == [("sag", "not-axial")]
    _, rejections = read_all(tmp_path, rule=SeriesRule(max_tilt_deg=5.0))
    assert {r.path for r in rejections} == {"sag", "tilt"}


def test_bad_files_are_rejected_with_reasons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, paths = write_series(tmp_path / "ok", phantom(3), seed=50)
    good = paths[0].read_bytes()
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "cut_pixels.dcm").write_bytes(good[: len(good) - 100])
    (tmp_path / "cut_header.dcm").write_bytes(good[:300])
    (tmp_path / "empty").write_bytes(b"")
    dicomdir = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "DICOMDIR"
    (tmp_path / "DICOMDIR").write_bytes(dicomdir.read_bytes())
    _, paths = write_series(tmp_path / "mpeg", phantom(2), seed=51)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
        ds.PixelData = encapsulate([bytes(64)])
        ds.save_as(path)
    scans, rejections = read_all(tmp_path)
    assert [s.source for s in scans] == ["ok"]
    found = {r.path: r.reason for r in rejections}
    assert found == {
        "notes.txt": "not-dicom",
        "empty": "not-dicom",
        "cut_pixels.dcm": "corrupt",
        "cut_header.dcm": "corrupt",
        "mpeg": "unsupported-transfer-syntax",
    }

    class MissingDecoder:
        is_available = False
        missing_dependencies = ["pylibjpeg-rle - requires pylibjpeg>=2.0"]

    monkeypatch.setattr(dicom_reader, "get_decoder", lambda uid: MissingDecoder())
    _, rejections = read_all(tmp_path / "mpeg")
    assert "install one of: pylibjpeg-rle" in rejections[0].detail


def test_load_decodes_only_the_asked_slices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hu = phantom(6)
    write_series(tmp_path / "ser", hu, seed=60, naming="uid")
    [scan], _ = read_all(tmp_path)
    opened: list[str] = []
    real_decode = dicom_reader._decode_hu

    def counting_decode(s: dicom_reader._Slice) -> np.ndarray:
        opened.append(s.path.stem)
        return real_decode(s)

    monkeypatch.setattr(dicom_reader, "_decode_hu", counting_decode)
    load = pickle.loads(pickle.dumps(scan.load))  # scans can go to worker processes
    assert np.array_equal(load(2, 4), np.rint(hu[2:4]))
    assert opened == list(scan.instance_uids[2:4])
    with pytest.raises(ValueError, match="out of range"):
        scan.load(4, 7)


def test_a_slice_that_fails_at_load_time_names_its_file(tmp_path: Path) -> None:
    _, paths = write_series(tmp_path / "ser", phantom(3), seed=70)
    [scan], _ = read_all(tmp_path)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[:200])  # damaged after the headers were read
    with pytest.raises(ScanLoadError) as caught:
        scan.load(0, 3)
    rejection = caught.value.rejection
    assert (rejection.path, rejection.reason) == ("ser/IM0002.dcm", "corrupt")


def test_progress_bar_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_series(tmp_path / "ser", phantom(2), seed=80)
    scans, _ = read_all(tmp_path, progress=True)
    assert len(scans) == 1 and capsys.readouterr().out == ""


@settings(max_examples=15, deadline=None)
@given(st.permutations(range(6)))
def test_file_names_never_change_the_order(
    tmp_path_factory: pytest.TempPathFactory, order: list[int]
) -> None:
    root = tmp_path_factory.mktemp("perm")
    _, paths = write_series(root / "w", phantom(6), seed=90, naming="no-extension")
    expected = sop_uids(paths)
    scramble(paths, root / "in" / "ser", [f"{k:02d}" for k in order])
    [scan], _ = read_all(root / "in")
    assert scan.instance_uids == expected


def test_every_pydicom_test_file_is_in_a_scan_a_rejection_or_ignored() -> None:
    root = Path(pydicom.__file__).parent / "data" / "test_files"
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    items = list(read_input(root, "dicom"))
    scans = [i for i in items if isinstance(i, Scan)]
    failed_loads = []
    for scan in scans:
        try:
            scan.load(0, scan.n_slices)
        except ScanLoadError as exc:
            failed_loads.append(exc.rejection)
    # Each file is accounted for exactly once, by its own relative path.
    accounted = [path for item in items for path in files_of(item)]
    assert sorted(accounted) == files
    rejections = [i for i in items if isinstance(i, Rejection)]
    assert {r.reason for r in rejections} <= set(REASONS)
    ignored = [i for i in items if isinstance(i, Ignored)]
    assert ignored and all(i.path.endswith("DICOMDIR") or "DICOMDIR" in i.path for i in ignored)
    series = [r for r in rejections if len(r.files) > 1]
    assert series and all(re.search(rf"\({len(r.files)} of \d+ files\)$", r.detail) for r in series)
    assert len(scans) >= 3 and all(r.reason in REASONS for r in failed_loads)
