"""Read hospital DICOM exports into axial CT scans (the rules are in docs/dicom.md).

Headers are read without pixel data; files are grouped by study and series, one axial CT
series is chosen per study by a :class:`SeriesRule`, its slices are sorted by their position
along the slice normal (as ITK/GDCM do, never by file name), and pixels are decoded to
Hounsfield units only for the slices a caller loads.  Every unusable input becomes a
:class:`~fedct.common.ingest.base.Rejection`; the walk never stops on bad data.  Decoded
stored values are checked against BitsStored before the bits above it are cleared (values
that do not fit are damaged pixel data, not an overlay), and RescaleSlope and
RescaleIntercept must be finite numbers (common/ingest/voxels.py checks the rest).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.filereader import read_partial
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
)
from rich.console import Console
from rich.progress import track

from fedct.common.ingest.base import Ignored, Rejection, Scan, ScanLoadError
from fedct.common.ingest.pool import forked_pool
from fedct.common.ingest.voxels import AIR_HU, MAX_SLICE_PIXELS, brief, stored_value_problem
from fedct.common.ingest.walk import walk_input

# pydicom's warnings and log records quote header values, which may be patient data; this
# reader reports every problem as a rejection instead.
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
logging.getLogger("pydicom").setLevel(logging.ERROR)

DICOMDIR = "DICOMDIR index of the export (its images are read from their own files)"
_PIXEL_DATA = 0x7FE00010
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, _PIXEL_DATA})
_UNDEFINED_LENGTH = 0xFFFFFFFF
_MIN_ENCAPSULATED = 16
_SAME_POSITION_MM = 1e-3
_HEADER_CHUNK = 64  # files a header-reading process takes at a time
_NATIVE_SYNTAXES = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
_MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})


@dataclass(frozen=True)
class _NativePixels:
    """Where an uncompressed 16-bit little-endian image lies in its file and how its values
    become HU, read from the header: what decoding it needs, without parsing the file again."""

    offset: int
    signed: bool
    unused_bits: int  # BitsAllocated - BitsStored, cleared as pydicom does
    overlay: bool  # an overlay plane lives in the unused bits (then they are not checked)
    slope: float
    intercept: float
    padding: tuple[int, int] | None  # PixelPaddingValue .. PixelPaddingRangeLimit


@dataclass(frozen=True)
class SeriesRule:
    """How the scan of a study is chosen among its series (see docs/dicom.md).

    Only CT, non-localizer, axial series are candidates.  They are ranked by: a
    ``ConvolutionKernel`` containing ``prefer_kernel`` (case-insensitive) first, then
    ``SliceThickness`` closest to ``prefer_thickness_mm``, then most slices, then path.
    """

    max_tilt_deg: float = 10.0  # slice normal within this angle of the patient z axis
    prefer_kernel: str | None = None
    prefer_thickness_mm: float | None = None
    one_series_per_study: bool = True  # False: every axial CT series becomes a scan
    irregular_step_fraction: float = 0.1  # a step this far from the median step is irregular


@dataclass(frozen=True)
class _Slice:
    """What the header of one image file says (no pixels)."""

    path: Path
    rel: str
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    series_number: int
    modality: str
    image_type: tuple[str, ...]
    transfer_syntax: str
    frames: int
    rows: int
    cols: int
    orientation: tuple[float, ...] | None
    position: tuple[float, ...] | None
    instance: int | None
    pixel_spacing: tuple[float, ...] | None
    thickness: float | None
    spacing_between: float | None
    kernel: str
    manufacturer: str
    has_rescale: bool
    native: _NativePixels | None  # None: decoded by pydicom
    overlay: bool = False  # an overlay plane lives in bits above BitsStored


def read_dicom(
    root: Path,
    files: list[Path] | None = None,
    *,
    rule: SeriesRule = SeriesRule(),
    progress: bool = False,
    workers: int = 1,
) -> Iterator[Scan | Rejection | Ignored]:
    """Read ``files`` (default: every regular file under ``root``, common/ingest/walk.py)
    and yield one scan per study (or per series, see ``rule``).

    Rejections come first (files that are not usable images) with the DICOMDIR indexes
    (ignored), then per study the chosen scan(s) and the rejected series.  Reading is lazy
    only for pixels: all headers are read before the first item is yielded, because series
    span many files.  ``workers`` > 1 parses the headers in that many processes.
    """
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder")
    paths = walk_input(root).files if files is None else list(files)
    results: Iterable[_Slice | Rejection | Ignored] = _read_headers(root, paths, workers)
    if progress:
        results = track(
            results,
            total=len(paths),
            description="Reading DICOM headers",
            console=Console(stderr=True),
        )
    headers = list(results)
    yield from (r for r in headers if not isinstance(r, _Slice))
    yield from _assemble(root, [s for s in headers if isinstance(s, _Slice)], rule)


def _read_headers(
    root: Path, paths: list[Path], workers: int
) -> Iterator[_Slice | Rejection | Ignored]:
    """The header of every path, in order; parsing is CPU-bound, so several processes (forked,
    leaving stopping to the parent: common/ingest/pool.py) share it when ``workers`` > 1 and
    there is enough to share."""
    chunks = [(root, paths[i : i + _HEADER_CHUNK]) for i in range(0, len(paths), _HEADER_CHUNK)]
    if workers <= 1 or len(chunks) <= 1:
        for chunk in chunks:
            yield from _header_chunk(chunk)
        return
    with forked_pool(min(workers, len(chunks))) as pool:
        for headers in pool.imap(_header_chunk, chunks):
            yield from headers


def _header_chunk(job: tuple[Path, list[Path]]) -> list[_Slice | Rejection | Ignored]:
    root, paths = job
    # Threads overlap file I/O (network shares, cold disks); the parsing itself holds the GIL.
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda p: _read_header(p, p.relative_to(root).as_posix()), paths))


class _Probe:
    """A pydicom ``stop_when`` hook: stops before the pixel data and notes how far element
    values reach, so that a truncated file is caught without reading its pixels."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.value_end = 0
        self.pixel_tag: int | None = None
        self.pixel_length = 0
        self.pixel_offset = 0

    def __call__(self, tag: int, vr: str | None, length: int) -> bool:
        value_start = self._f.tell()
        # Encapsulated pixel data needs at least an offset table and one fragment header.
        reach = _MIN_ENCAPSULATED if length == _UNDEFINED_LENGTH else length
        if length != _UNDEFINED_LENGTH or tag in _PIXEL_TAGS:
            self.value_end = max(self.value_end, value_start + reach)
        if tag in _PIXEL_TAGS:
            self.pixel_tag, self.pixel_length = int(tag), length
            self.pixel_offset = value_start
            return True
        return False


def _read_header(path: Path, rel: str) -> _Slice | Rejection | Ignored:
    """Parse one file up to its pixel data; a DICOMDIR (an index, not an image) is ignored."""
    has_marker = False
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            has_marker = f.read(132)[128:] == b"DICM"
            f.seek(0)
            probe = _Probe(f)
            ds = read_partial(f, stop_when=probe, force=True)
    except OSError as exc:
        return Rejection(rel, "unreadable", f"cannot read the file: {exc.strerror or exc}")
    except Exception as exc:  # pydicom raises many types on malformed input
        return Rejection(rel, "corrupt" if has_marker else "not-dicom", brief(exc))
    try:
        return _parse(path, rel, ds, has_marker, probe, size)
    except Exception as exc:  # a malformed value (e.g. text in a numeric tag)
        return Rejection(rel, "corrupt", f"malformed header: {brief(exc)}")


def _parse(
    path: Path, rel: str, ds: pydicom.Dataset, has_marker: bool, probe: _Probe, size: int
) -> _Slice | Rejection | Ignored:
    meta = getattr(ds, "file_meta", None) or pydicom.Dataset()
    sop_class = meta.get("MediaStorageSOPClassUID") or ds.get("SOPClassUID")
    if sop_class == MediaStorageDirectoryStorage or "DirectoryRecordSequence" in ds:
        return Ignored(rel, DICOMDIR)
    if not any(k in ds for k in ("SOPClassUID", "StudyInstanceUID", "Modality")):
        if has_marker:
            return Rejection(rel, "corrupt", "no data elements after the file meta (truncated?)")
        return Rejection(rel, "not-dicom", "no DICOM preamble and no DICOM identity tags")
    transfer_syntax = str(meta.get("TransferSyntaxUID", ""))
    # A deflated file's offsets refer to the inflated stream; it is checked when decoded.
    if probe.value_end > size and transfer_syntax != DeflatedExplicitVRLittleEndian:
        return Rejection(
            rel, "corrupt", f"truncated: the file ends {probe.value_end - size} bytes early"
        )
    if probe.pixel_tag != _PIXEL_DATA:
        if "Rows" in ds:  # an image whose file stops before its pixels
            return Rejection(rel, "corrupt", "an image without Pixel Data (truncated?)")
        return Rejection(rel, "no-pixel-data", f"no image pixels ({_sop_name(sop_class)})")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns"):
        if not ds.get(keyword):
            return Rejection(rel, "corrupt", f"the image has no {keyword}")
    short = _short_pixel_data(ds, probe.pixel_length)
    if short:
        return Rejection(rel, "corrupt", short)
    return _Slice(
        path=path,
        rel=rel,
        patient_id=str(ds.get("PatientID", "")),
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        sop_uid=str(ds.get("SOPInstanceUID", "")) or rel,
        series_number=int(ds.get("SeriesNumber") or 0),
        modality=str(ds.get("Modality", "")),
        image_type=tuple(str(v).upper() for v in _values(ds.get("ImageType"))),
        transfer_syntax=transfer_syntax,
        frames=int(ds.get("NumberOfFrames") or 1),
        rows=int(ds.Rows),
        cols=int(ds.Columns),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        position=_floats(ds.get("ImagePositionPatient"), 3),
        instance=int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else None,
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2),
        thickness=_float(ds.get("SliceThickness")),
        spacing_between=_float(ds.get("SpacingBetweenSlices")),
        kernel=" ".join(str(v) for v in _values(ds.get("ConvolutionKernel"))),
        manufacturer=str(ds.get("Manufacturer", "")),
        has_rescale="RescaleSlope" in ds and "RescaleIntercept" in ds,
        native=_native_pixels(ds, transfer_syntax, has_marker, probe, size),
        overlay=_overlay_in_pixels(ds),
    )


def _overlay_in_pixels(ds: pydicom.Dataset) -> bool:
    """Whether an overlay plane (retired, still found in old exports) is stored in the
    bits of the pixel data above BitsStored."""
    bits_stored = int(ds.get("BitsStored") or 16)
    positions = (ds.get((group, 0x0102)) for group in range(0x6000, 0x6020, 2))
    return any(
        p is not None and p.value is not None and int(p.value) >= bits_stored for p in positions
    )


def _native_pixels(
    ds: pydicom.Dataset, transfer_syntax: str, has_marker: bool, probe: _Probe, size: int
) -> _NativePixels | None:
    """The layout of the image when reading its bytes gives exactly what pydicom's decoding
    would: a DICOM file (with preamble) in little-endian native encoding whose last element is
    the Pixel Data of one 16-bit grey frame.  None for anything else, which pydicom decodes."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits_stored = int(ds.BitsStored)
        simple = (
            has_marker
            and transfer_syntax in _NATIVE_SYNTAXES
            and probe.pixel_length == rows * cols * 2
            and probe.pixel_offset + probe.pixel_length == size
            and int(ds.SamplesPerPixel) == 1
            and int(ds.BitsAllocated) == 16
            and 1 <= bits_stored <= 16
            and int(ds.PixelRepresentation) in (0, 1)
            and str(ds.PhotometricInterpretation) in _MONOCHROME
            and int(ds.get("NumberOfFrames") or 1) == 1
        )
        if not simple:
            return None
        padding = ds.get("PixelPaddingValue")
        limit = ds.get("PixelPaddingRangeLimit", padding)
        return _NativePixels(
            offset=probe.pixel_offset,
            signed=int(ds.PixelRepresentation) == 1,
            unused_bits=16 - bits_stored,
            overlay=_overlay_in_pixels(ds),
            slope=float(ds.get("RescaleSlope", 1.0)),
            intercept=float(ds.get("RescaleIntercept", 0.0)),
            padding=None
            if padding is None
            else (int(min(padding, limit)), int(max(padding, limit))),
        )
    except Exception:  # a missing or malformed value: pydicom decides when decoding
        return None


def _short_pixel_data(ds: pydicom.Dataset, length: int) -> str:
    """Why native pixel data is too short for the image, or ''."""
    if length == _UNDEFINED_LENGTH:
        return ""
    frames = int(ds.get("NumberOfFrames") or 1)
    samples = int(ds.get("SamplesPerPixel") or 1)
    bits = int(ds.get("BitsAllocated") or 16)
    expected = (int(ds.Rows) * int(ds.Columns) * samples * frames * bits + 7) // 8
    return (
        f"Pixel Data holds {length} bytes, the image needs {expected}" if length < expected else ""
    )


def _assemble(root: Path, slices: list[_Slice], rule: SeriesRule) -> Iterator[Scan | Rejection]:
    series: dict[tuple[str, str], list[_Slice]] = defaultdict(list)
    for s in slices:
        series[(s.study_uid, s.series_uid)].append(s)
    series_in_folder: dict[Path, set[tuple[str, str]]] = defaultdict(set)
    for key, files in series.items():
        for s in files:
            series_in_folder[s.path.parent].add(key)

    def place(key: tuple[str, str], files: list[_Slice]) -> str:
        """The series folder when it holds exactly this series and nothing else, else the file."""
        folders = {s.path.parent for s in series[key]}
        if len(files) == len(series[key]) and len(folders) == 1:
            folder = folders.pop()
            if series_in_folder[folder] == {key}:
                return folder.relative_to(root).as_posix()
        return min(s.rel for s in files)

    studies: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for key in series:
        studies[key[0]].append(key)
    for study_uid in sorted(studies):
        candidates: list[tuple[Scan, str]] = []
        for key in sorted(studies[study_uid]):
            problems: dict[tuple[str, str], list[_Slice]] = defaultdict(list)
            usable = []
            for s in series[key]:
                problem = _file_problem(s, rule)
                if problem:
                    problems[problem].append(s)
                else:
                    usable.append(s)
            total = len(series[key])
            for (reason, detail), files in problems.items():
                yield Rejection(
                    place(key, files),
                    reason,
                    f"{detail} ({len(files)} of {total} files)",
                    tuple(s.rel for s in files),
                )
            if usable:
                count = f"{len(usable)} of {total} files"
                try:
                    built = _build_scan(place(key, usable), usable, rule)
                except Exception as exc:  # header values no rule here foresaw
                    built = "reader-error", brief(exc)
                if isinstance(built, Scan):
                    candidates.append((built, count))
                else:
                    yield Rejection(
                        place(key, usable),
                        built[0],
                        f"{built[1]} ({count})",
                        tuple(s.rel for s in usable),
                    )
        yield from _choose(candidates, rule)


def _file_problem(s: _Slice, rule: SeriesRule) -> tuple[str, str] | None:
    """A reason (and detail) why this image cannot be a slice of an axial CT scan."""
    if s.modality.upper() != "CT":
        return "not-ct", f"Modality {s.modality or 'missing'}"
    if "LOCALIZER" in s.image_type:
        return "localizer", "ImageType " + "\\".join(s.image_type)
    if s.frames != 1:
        return "inconsistent-geometry", f"a multi-frame image ({s.frames} frames); slices expected"
    if s.rows * s.cols > MAX_SLICE_PIXELS:
        return "too-large", f"{s.rows} x {s.cols} pixels: larger than any CT slice"
    codec = _codec_problem(s.transfer_syntax)
    if codec:
        return "unsupported-transfer-syntax", codec
    if s.orientation is None:
        return "not-axial", "no ImageOrientationPatient"
    tilt = math.degrees(math.acos(min(1.0, abs(float(_normal(s.orientation)[2])))))
    if tilt > rule.max_tilt_deg:
        return "not-axial", f"slice normal {tilt:.0f} degrees from the z axis"
    return None


def _codec_problem(transfer_syntax: str) -> str:
    """'' when pydicom can decode this transfer syntax, else what to install."""
    if not transfer_syntax:
        return ""  # no file meta: pydicom falls back to the dataset's own (native) encoding
    uid = UID(transfer_syntax)
    if not uid.is_transfer_syntax:
        return f"unknown transfer syntax {transfer_syntax}"
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"{uid.name}: pydicom has no decoder for it"
    if decoder.is_available:
        return ""
    return f"{uid.name}: install one of: " + "; ".join(decoder.missing_dependencies)


def _build_scan(source: str, files: list[_Slice], rule: SeriesRule) -> Scan | tuple[str, str]:
    """Sort one series' slices into a scan, or say why they do not form a regular volume."""
    every_file = tuple(sorted(s.rel for s in files))  # duplicate copies included
    files, dropped, conflict = _deduplicate(files)
    if conflict:
        return "inconsistent-geometry", conflict
    first = files[0]
    mismatch = _mismatch(files)
    if mismatch:
        return "inconsistent-geometry", mismatch
    if first.pixel_spacing is None:
        return "inconsistent-geometry", "no PixelSpacing"
    ordered = _order(files, rule.irregular_step_fraction)
    if isinstance(ordered, str):
        return "inconsistent-geometry", ordered
    files, step, warnings = ordered
    if step is None:
        return "inconsistent-geometry", "slice spacing unknown (no positions, spacing or thickness)"
    if dropped:
        warnings += ("duplicate-instance",)
    if not all(s.has_rescale for s in files):
        warnings += ("no-rescale",)
    if not first.patient_id:
        warnings += ("no-patient-id",)
    return Scan(
        source=source,
        patient_key=first.patient_id or first.study_uid,
        study_key=first.study_uid,
        series_key=first.series_uid,
        n_slices=len(files),
        spacing_mm=(step, *first.pixel_spacing),
        thickness_mm=first.thickness,
        manufacturer=first.manufacturer,
        format="dicom",
        intensity="hu",
        load=_Loader(tuple(files)),
        extra={"kernel": first.kernel, "series_number": str(first.series_number)},
        instance_uids=tuple(s.sop_uid for s in files),
        warnings=warnings,
        files=every_file,
    )


def _deduplicate(files: list[_Slice]) -> tuple[list[_Slice], int, str]:
    """One file per SOP instance, how many copies were dropped, and a note if copies disagree."""
    by_uid: dict[str, list[_Slice]] = defaultdict(list)
    for s in sorted(files, key=lambda s: s.rel):
        by_uid[s.sop_uid].append(s)
    for copies in by_uid.values():
        if len({c.position for c in copies}) > 1:
            return [], 0, f"{len(copies)} files share a SOPInstanceUID but not a position"
    return [copies[0] for copies in by_uid.values()], len(files) - len(by_uid), ""


def _mismatch(files: list[_Slice]) -> str:
    first = files[0]
    for s in files[1:]:
        if (s.rows, s.cols) != (first.rows, first.cols):
            return f"slice sizes differ: {first.rows}x{first.cols} and {s.rows}x{s.cols}"
        if not _close(s.orientation, first.orientation):
            return "ImageOrientationPatient differs between slices"
        if not _close(s.pixel_spacing, first.pixel_spacing):
            return "PixelSpacing differs between slices"
    return ""


def _order(
    files: list[_Slice], irregular_fraction: float
) -> tuple[list[_Slice], float | None, tuple[str, ...]] | str:
    """Slices sorted along the normal, the slice step and QA warnings; or why they cannot be."""
    nominal = files[0].spacing_between or files[0].thickness
    if any(s.position is None for s in files):
        numbers = [s.instance for s in files]
        if None in numbers or len(set(numbers)) < len(numbers):
            return "no ImagePositionPatient and no distinct InstanceNumbers to order slices"
        return sorted(files, key=lambda s: s.instance), nominal, ("no-positions",)
    normal = _normal(files[0].orientation)
    depth = {s.sop_uid: float(np.dot(s.position, normal)) for s in files}
    ordered = sorted(files, key=lambda s: depth[s.sop_uid])
    steps = np.diff([depth[s.sop_uid] for s in ordered])
    if len(steps) == 0:
        return ordered, nominal, ()
    repeats = int((steps < _SAME_POSITION_MM).sum())
    if repeats:
        at = depth[ordered[int(np.argmax(steps < _SAME_POSITION_MM))].sop_uid]
        return f"{repeats} slice(s) repeat a position (e.g. {at:.2f} mm along the normal)"
    step = float(np.median(steps))
    irregular = np.abs(steps - step).max() > irregular_fraction * step
    return ordered, step, ("irregular-spacing",) if irregular else ()


def _choose(candidates: list[tuple[Scan, str]], rule: SeriesRule) -> Iterator[Scan | Rejection]:
    """The study's scan(s) by ``rule``; the other candidates as ``not-selected``."""
    if not rule.one_series_per_study:
        yield from (scan for scan, _ in candidates)
        return

    def rank(candidate: tuple[Scan, str]) -> tuple[bool, float, int]:
        scan = candidate[0]
        kernel_ok = rule.prefer_kernel is None or (
            rule.prefer_kernel.lower() in scan.extra["kernel"].lower()
        )
        if rule.prefer_thickness_mm is None:
            closeness = 0.0
        elif scan.thickness_mm is None:
            closeness = -math.inf
        else:
            closeness = -abs(scan.thickness_mm - rule.prefer_thickness_mm)
        return kernel_ok, closeness, scan.n_slices

    ranked = sorted(candidates, key=lambda c: c[0].source)
    ranked.sort(key=rank, reverse=True)  # stable: ties keep the path order
    if not ranked:
        return
    chosen = ranked[0][0]
    yield chosen
    for other, count in ranked[1:]:
        yield other.rejected(
            "not-selected", f"{_describe(other)} lost to {_describe(chosen)} ({count})"
        )


def _describe(scan: Scan) -> str:
    thickness = "?" if scan.thickness_mm is None else f"{scan.thickness_mm:g}"
    return (
        f"series {scan.extra['series_number']} ({scan.n_slices} slices, {thickness} mm, "
        f"kernel {scan.extra['kernel'] or '?'})"
    )


@dataclass(frozen=True)
class _Loader:
    """``Scan.load`` of one series: decodes only the slices asked for; picklable, so that
    scans can be handed to worker processes."""

    files: tuple[_Slice, ...]

    def __call__(self, start: int, stop: int) -> np.ndarray:
        if not 0 <= start < stop <= len(self.files):
            raise ValueError(f"slices {start}:{stop} out of range for {len(self.files)} slices")
        first = self.files[0]
        out = np.empty((stop - start, first.rows, first.cols), dtype=np.float32)
        for i, s in enumerate(self.files[start:stop]):
            out[i] = _decode_hu(s)
        return out


def _decode_hu(s: _Slice) -> np.ndarray:
    """Decode one slice to float32 HU, padding pixels set to air."""
    if s.native is not None:
        stored = _read_native(s, s.native)
        slope, intercept, padding = s.native.slope, s.native.intercept, s.native.padding
    else:
        stored, slope, intercept, padding = _decode_pydicom(s)
    if not (math.isfinite(slope) and math.isfinite(intercept)):
        raise ScanLoadError(
            s.rel, "non-finite-voxels", f"RescaleSlope {slope} or RescaleIntercept {intercept}"
        )
    hu = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    if padding is not None:
        low, high = padding
        hu[(stored >= low) & (stored <= high)] = AIR_HU
    return hu


def _read_native(s: _Slice, native: _NativePixels) -> np.ndarray:
    """The stored values of an image of :func:`_native_pixels`, as pydicom returns them."""
    length = s.rows * s.cols * 2
    try:
        with s.path.open("rb") as f:
            f.seek(native.offset)
            data = f.read(length)
    except OSError as exc:
        raise ScanLoadError(
            s.rel, "corrupt", f"cannot read the file: {exc.strerror or exc}"
        ) from exc
    if len(data) != length:
        raise ScanLoadError(s.rel, "corrupt", f"the file ends {length - len(data)} bytes early")
    raw = np.frombuffer(data, "<i2" if native.signed else "<u2").reshape(s.rows, s.cols)
    return _clear_unused_bits(s, raw, 16 - native.unused_bits, native.signed)


def _clear_unused_bits(s: _Slice, raw: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Stored values as pydicom's ``correct_unused_bits`` gives them (the bits above BitsStored
    cleared, signed values sign-extended), once it is sure those bits hold no damage."""
    unused = raw.dtype.itemsize * 8 - bits_stored
    if unused <= 0 or raw.dtype.kind not in "iu":
        return raw
    if not s.overlay:
        problem = stored_value_problem(raw, bits_stored, signed)
        if problem:
            raise ScanLoadError(s.rel, "out-of-range-voxels", problem)
    return np.right_shift(np.left_shift(raw, unused), unused)


def _decode_pydicom(s: _Slice) -> tuple[np.ndarray, float, float, tuple[int, int] | None]:
    """Stored values, rescale slope and intercept, and padding range of any other image."""
    try:
        ds = pydicom.dcmread(s.path)
        with _codec_output_silenced():
            raw = pixel_array(ds, correct_unused_bits=False)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # any decoder failure is a property of this file; a Rust
        # codec's panic (pyo3's PanicException) is a BaseException, not an Exception
        raise ScanLoadError(s.rel, "corrupt", brief(exc)) from exc
    if raw.shape != (s.rows, s.cols):
        raise ScanLoadError(s.rel, "corrupt", f"decoded shape {raw.shape}")
    bits_stored = int(ds.get("BitsStored") or raw.dtype.itemsize * 8)
    stored = _clear_unused_bits(s, raw, bits_stored, raw.dtype.kind == "i")
    slope = float(ds.get("RescaleSlope", 1.0))
    intercept = float(ds.get("RescaleIntercept", 0.0))
    padding = ds.get("PixelPaddingValue")
    if padding is None:
        return stored, slope, intercept, None
    limit = ds.get("PixelPaddingRangeLimit", padding)
    return stored, slope, intercept, (min(padding, limit), max(padding, limit))


@contextmanager
def _codec_output_silenced() -> Iterator[None]:
    """Send what a codec prints to fd 2 itself (a Rust panic's message and backtrace) to
    /dev/null for the block: damaged pixel data ends as one rejection, whose detail is the
    exception's message, not as pages on the console."""
    sys.stderr.flush()
    saved = os.dup(2)
    sink = os.open(os.devnull, os.O_WRONLY)
    os.dup2(sink, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(sink)


def _normal(orientation: tuple[float, ...]) -> np.ndarray:
    normal = np.cross(orientation[:3], orientation[3:])
    return normal / (np.linalg.norm(normal) or 1.0)


def _close(a: tuple[float, ...] | None, b: tuple[float, ...] | None) -> bool:
    if a is None or b is None:
        return a is b
    return bool(np.allclose(a, b, atol=1e-4))


def _values(value: object) -> list[object]:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, MultiValue) else [value]


def _floats(value: object, n: int) -> tuple[float, ...] | None:
    numbers = tuple(float(v) for v in _values(value))
    return numbers if len(numbers) == n and all(map(math.isfinite, numbers)) else None


def _float(value: object) -> float | None:
    return float(value) if value not in (None, "") else None


def _sop_name(sop_class: object) -> str:
    return UID(str(sop_class)).name if sop_class else "no SOP class"
