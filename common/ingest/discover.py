"""Pick the reader for an input folder (DICOM, NIfTI or slice images) and account for every
entry in it.

The folder is walked once (common/ingest/walk.py): links, unreadable and special files are
accounted for there, and the readers get the regular files.  Whatever the reader, each file
and link under the folder ends up in exactly one place: a scan's ``files``, a rejection's
``files``, or an :class:`~fedct.common.ingest.base.Ignored` entry.  The site's labels file
(``labels.csv`` in the folder, or the ``--labels`` file when it lies inside) is ignored, not
rejected as "not DICOM"; so is a file that the chosen format's reader does not read (e.g. a
README beside NIfTI volumes).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path

from fedct.common.ingest import FORMATS
from fedct.common.ingest.base import Ignored, ReaderItem, Rejection, Scan
from fedct.common.ingest.dicom import read_dicom
from fedct.common.ingest.nifti import NIFTI_SUFFIXES, is_nifti, read_nifti
from fedct.common.ingest.slice_images import IMAGE_SUFFIXES, is_slice_image, read_slice_images
from fedct.common.ingest.walk import walk_input

LABELS_FILE = "labels.csv"
LABELS_WHAT = "the site's labels file (give it to prepare with --labels)"
READS = {"nifti": ", ".join(NIFTI_SUFFIXES), "png": ", ".join(IMAGE_SUFFIXES)}


def detect_format(files: list[Path]) -> str:
    """``nifti`` or ``png`` when most ``files`` are such files, otherwise ``dicom``."""
    counts = {"nifti": 0, "png": 0, "other": 0}
    for path in files:
        kind = "nifti" if is_nifti(path) else "png" if is_slice_image(path) else "other"
        counts[kind] += 1
    best = max(("nifti", "png"), key=lambda k: counts[k])
    return best if counts[best] > counts["other"] else "dicom"


def files_of(item: ReaderItem) -> tuple[str, ...]:
    """The input files (relative paths) that ``item`` accounts for."""
    if isinstance(item, Ignored):
        return (item.path,)
    return item.files if isinstance(item, Scan | Rejection) else ()


def _labels_files(root: Path, labels: Path | None) -> set[str]:
    """Relative paths of the labels files inside ``root``."""
    found = {LABELS_FILE} if (root / LABELS_FILE).is_file() else set()
    if labels is not None and Path(labels).resolve().is_relative_to(root.resolve()):
        found.add(Path(labels).resolve().relative_to(root.resolve()).as_posix())
    return found


def read_input(
    root: Path,
    fmt: str = "auto",
    *,
    progress: bool = False,
    labels: Path | None = None,
    workers: int = 1,
) -> Iterator[ReaderItem]:
    """Scans, rejections and ignored files of ``root`` read in format ``fmt`` (``auto``
    detects it); ``labels`` is the labels file, when one is given; ``workers`` processes
    may share the reading of DICOM headers."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: input folder does not exist")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    walk = walk_input(root)
    if fmt == "auto":
        fmt = detect_format(walk.files)
    labels_files = _labels_files(root, labels)
    items = _reader(root, walk.files, fmt, progress, workers)
    found = chain(walk.rejections, walk.ignored, items)
    return _accounted(root, fmt, walk.files, found, labels_files)


def _reader(
    root: Path, files: list[Path], fmt: str, progress: bool, workers: int
) -> Iterator[ReaderItem]:
    if fmt == "nifti":
        return read_nifti(root, files)
    if fmt == "png":
        return read_slice_images(root, files)
    return read_dicom(root, files, progress=progress, workers=workers)


def _accounted(
    root: Path,
    fmt: str,
    files: list[Path],
    items: Iterable[ReaderItem],
    labels_files: set[str],
) -> Iterator[ReaderItem]:
    seen: set[str] = set()
    for item in items:
        if isinstance(item, Rejection) and item.files == (item.path,) and item.path in labels_files:
            item = Ignored(item.path, LABELS_WHAT)
        seen.update(files_of(item))
        yield item
    for path in files:
        rel = path.relative_to(root).as_posix()
        if rel not in seen:
            reads = READS.get(fmt, "every file")
            what = LABELS_WHAT if rel in labels_files else f"not read as {fmt} (it reads {reads})"
            yield Ignored(rel, what)
