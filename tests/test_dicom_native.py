"""The DICOM reader's fast paths give exactly what the plain ones give: the direct read of
uncompressed pixels (pydicom's decoding), and headers parsed in several processes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from fedct.common.ingest import dicom as dicom_reader
from fedct.common.ingest.dicom import read_dicom
from fedct.common.synth.dicom_writer import ScannerProfile, SeriesSpec, make_uid, write_ct_series

PROFILES = {
    "signed": ScannerProfile(),
    "unsigned-padded": ScannerProfile(
        signed=False, rescale_slope=0.5, rescale_intercept=-1000.5, pixel_padding_value=0
    ),
    "signed-padded": ScannerProfile(pixel_padding_value=-2000),
}


def header(path: Path) -> dicom_reader._Slice:
    found = dicom_reader._read_header(path, path.name)
    assert isinstance(found, dicom_reader._Slice), found
    return found


def both_decodings(path: Path) -> tuple[dicom_reader._Slice, np.ndarray, np.ndarray]:
    s = header(path)
    return (
        s,
        dicom_reader._decode_hu(s),
        dicom_reader._decode_hu(dataclasses.replace(s, native=None)),
    )


def write_one(tmp_path: Path, syntax: str, profile: ScannerProfile) -> Path:
    rng = np.random.default_rng(7)
    hu = rng.integers(-1100, 2500, (2, 24, 20)).astype(np.float32)
    spec = SeriesSpec("A^B", "P1", make_uid(rng), make_uid(rng), transfer_syntax=syntax)  # type: ignore[arg-type]
    return write_ct_series(tmp_path / "series", hu, spec, profile, rng=rng)[0]


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("syntax", ["explicit", "implicit", "rle"])
def test_direct_read_equals_pydicom(tmp_path: Path, syntax: str, profile: str) -> None:
    s, direct, decoded = both_decodings(write_one(tmp_path, syntax, PROFILES[profile]))
    assert (s.native is None) == (syntax == "rle")  # compressed pixels go to pydicom
    assert direct.dtype == decoded.dtype == np.float32
    assert np.array_equal(direct, decoded)


def _bits_stored_12(ds: pydicom.Dataset) -> None:
    ds.BitsStored = 12


def _monochrome1(ds: pydicom.Dataset) -> None:
    ds.PhotometricInterpretation = "MONOCHROME1"


def _padding_range(ds: pydicom.Dataset) -> None:
    ds.add_new(0x00280120, "SS", -1024)
    ds.add_new(0x00280121, "SS", -1100)


@pytest.mark.parametrize("edit", [_bits_stored_12, _monochrome1, _padding_range])
def test_direct_read_of_edited_headers(
    tmp_path: Path, edit: Callable[[pydicom.Dataset], None]
) -> None:
    ds = pydicom.dcmread(write_one(tmp_path, "explicit", PROFILES["signed"]))
    edit(ds)
    path = tmp_path / "edited.dcm"
    ds.save_as(path, enforce_file_format=True)
    s, direct, decoded = both_decodings(path)
    assert s.native is not None
    assert np.array_equal(direct, decoded)


def test_data_after_the_pixels_is_left_to_pydicom(tmp_path: Path) -> None:
    path = write_one(tmp_path, "explicit", PROFILES["signed"])
    path.write_bytes(path.read_bytes() + b"\0" * 8)
    assert header(path).native is None


def test_a_file_cut_after_its_header_was_read_is_corrupt(tmp_path: Path) -> None:
    path = write_one(tmp_path, "explicit", PROFILES["signed"])
    s = header(path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(dicom_reader.ScanLoadError, match="10 bytes early"):
        dicom_reader._decode_hu(s)


def test_headers_read_in_processes_give_the_same_items(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dicom_reader, "_HEADER_CHUNK", 2)  # several chunks from a few files
    rng = np.random.default_rng(3)
    for i in range(3):
        hu = rng.integers(-1000, 1000, (3, 16, 16)).astype(np.float32)
        spec = SeriesSpec(f"P^{i}", f"P{i}", make_uid(rng), make_uid(rng))
        write_ct_series(tmp_path / f"s{i}", hu, spec, PROFILES["signed"], rng=rng)
    (tmp_path / "notes.txt").write_text("not an image")

    def items(workers: int) -> list[object]:
        return [
            (type(item).__name__, item.source if hasattr(item, "source") else item.path)
            for item in read_dicom(tmp_path, workers=workers)
        ]

    assert items(3) == items(1)
    assert len(items(1)) == 4
