"""What a radiologist hands to ``fedct diagnose`` or the viewer, as a folder the readers walk.

An input is a folder (DICOM with one or many studies, NIfTI volumes or slice images), a zip
of such a folder, or one file (a NIfTI volume, a DICOM file).  A zip is unpacked under the
caller's own work folder with limits on its size and file count, and an entry that would land
outside that folder (an absolute path, ``..``, a link) is refused: an upload is untrusted.
"""

from __future__ import annotations

import shutil
import stat
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from fedct.common.cache.pseudonym import pseudonym
from fedct.common.ingest.base import Scan
from fedct.common.ingest.discover import read_input

ZIP_SUFFIX = ".zip"


class InputError(ValueError):
    """An input that cannot be read as a study (one line, naming the input)."""


@dataclass(frozen=True)
class Limits:
    """The most an input may unpack to: bytes and files."""

    max_bytes: int = 4 << 30
    max_files: int = 20_000


def unpack_zip(archive: Path, dest: Path, limits: Limits = Limits()) -> None:
    """Unpack ``archive`` into the empty folder ``dest``; InputError if it is no zip, holds an
    unsafe entry or more than ``limits`` allow (checked before anything is written, and again
    while writing, since a header may lie about an entry's size)."""
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = [m for m in zipped.infolist() if not m.is_dir()]
            _check_members(archive, members, limits)
            written = 0
            for member in members:
                target = dest.joinpath(*PurePosixPath(member.filename).parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zipped.open(member) as source, target.open("wb") as sink:
                    while chunk := source.read(1 << 20):
                        written += len(chunk)
                        if written > limits.max_bytes:
                            raise InputError(
                                f"{archive.name}: unpacks to more than {_size(limits.max_bytes)}"
                            )
                        sink.write(chunk)
    except zipfile.BadZipFile as exc:
        raise InputError(f"{archive.name}: not a readable zip file ({exc})") from exc
    except (zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError) as exc:
        raise InputError(f"{archive.name}: cannot unpack ({exc})") from exc
    except OSError as exc:
        raise InputError(f"{archive.name}: cannot unpack ({exc.strerror or exc})") from exc


def _check_members(archive: Path, members: list[zipfile.ZipInfo], limits: Limits) -> None:
    if not members:
        raise InputError(f"{archive.name}: the zip holds no files")
    if len(members) > limits.max_files:
        raise InputError(
            f"{archive.name}: holds {len(members)} files, more than the {limits.max_files} allowed"
        )
    total = sum(m.file_size for m in members)
    if total > limits.max_bytes:
        raise InputError(
            f"{archive.name}: unpacks to {_size(total)}, more than {_size(limits.max_bytes)}"
        )
    for member in members:
        name = PurePosixPath(member.filename.replace("\\", "/"))
        unsafe = (
            name.is_absolute()
            or ".." in name.parts
            or ":" in member.filename
            or stat.S_ISLNK(member.external_attr >> 16)
        )
        if unsafe:
            raise InputError(
                f"{archive.name}: entry {member.filename!r} would land outside the study folder"
            )


def _size(count: int) -> str:
    return f"{count / 2**20:.0f} MiB"


@contextmanager
def input_folder(path: Path, work: Path, limits: Limits = Limits()) -> Iterator[Path]:
    """The folder to read for ``path``: the folder itself, or ``path`` (a zip or one file)
    unpacked or copied into a new folder under ``work``, removed afterwards."""
    path = Path(path)
    if path.is_dir():
        yield path
        return
    if not path.is_file():
        raise InputError(f"{path}: no such file or folder")
    work.mkdir(parents=True, exist_ok=True)
    folder = work / f"input-{path.stem}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    try:
        if path.suffix.lower() == ZIP_SUFFIX:
            unpack_zip(path, folder, limits)
        else:
            # A copy, not a link: the readers account for links as they do for any file.
            shutil.copyfile(path, folder / path.name)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class ScanSource(NamedTuple):
    """Where a prepared scan came from: its path relative to the input, its StudyInstanceUID
    (DICOM only; empty for NIfTI and slice images)."""

    source: str
    study_uid: str


def scan_id(salt: bytes, scan: Scan) -> str:
    """The id ``fedct prepare`` gives ``scan`` in a cache with ``salt``."""
    return pseudonym(salt, "scan", scan.study_key, scan.series_key)


def scan_sources(root: Path, fmt: str, salt: bytes) -> dict[str, ScanSource]:
    """The source of every scan of the raw folder ``root``, by the id prepare gives it under
    ``salt`` (headers only: no pixel is read)."""
    return {
        scan_id(salt, item): ScanSource(item.source, _study_uid(item))
        for item in read_input(root, fmt)
        if isinstance(item, Scan)
    }


def _study_uid(scan: Scan) -> str:
    return scan.study_key if scan.format == "dicom" else ""
