"""Every entry under an input folder, accounted for before any reader opens a file.

The walk lists the folder's regular files for the readers and turns everything a reader
cannot or must not open into a rejection with one reason code: a folder that cannot be
listed or a file that cannot be read (``unreadable``), a FIFO, socket or device
(``special-file``: never opened, since opening a FIFO waits for a writer), a symbolic link
whose target does not exist (``broken-link``) or lies outside the input folder
(``link-outside-input``: reading it would read another folder than the one given).

A link whose target lies inside the input folder is followed safely: what it leads to is
read once, under its own path (every real folder under the input is walked without going
through links), and the link is :class:`~fedct.common.ingest.base.Ignored` as a second
name for it.  Link loops therefore cannot make the walk go round.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from fedct.common.ingest.base import Ignored, Rejection

SPECIAL_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}
LINK_INSIDE = "a symbolic link to a file or folder of the input, read under its own path"


@dataclass
class Walk:
    """The regular files of an input folder (absolute, sorted by their path under it) and
    the entries that are no file to read."""

    files: list[Path] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    ignored: list[Ignored] = field(default_factory=list)


def walk_input(root: Path) -> Walk:
    """Walk ``root`` (see the module docstring); never raises for what it finds inside."""
    root = Path(root)
    real_root = Path(os.path.realpath(root))
    walk = Walk()
    pending = [root]
    while pending:
        folder = pending.pop()
        rel_folder = _rel(folder, root)
        try:
            with os.scandir(folder) as entries:
                listed = sorted(entries, key=lambda e: e.name)
        except OSError as exc:
            walk.rejections.append(
                Rejection(rel_folder, "unreadable", f"cannot list the folder: {_why(exc)}")
            )
            continue
        for entry in listed:
            path = Path(entry.path)
            rel = _rel(path, root)
            try:
                if entry.is_symlink():
                    _link(path, rel, real_root, walk)
                elif entry.is_dir(follow_symlinks=False):
                    pending.append(path)
                elif entry.is_file(follow_symlinks=False):
                    if os.access(path, os.R_OK):
                        walk.files.append(path)
                    else:
                        walk.rejections.append(
                            Rejection(rel, "unreadable", "no permission to read the file")
                        )
                else:
                    kind = stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode)
                    what = SPECIAL_KINDS.get(kind, "not a regular file")
                    walk.rejections.append(Rejection(rel, "special-file", what))
            except OSError as exc:  # the entry vanished or cannot be examined
                walk.rejections.append(Rejection(rel, "unreadable", _why(exc)))
    walk.files.sort(key=lambda p: _rel(p, root))
    return walk


def _link(path: Path, rel: str, real_root: Path, walk: Walk) -> None:
    target = Path(os.path.realpath(path))
    if not target.is_relative_to(real_root):
        walk.rejections.append(
            Rejection(
                rel,
                "link-outside-input",
                "a symbolic link that leads outside the input folder; give that folder as "
                "the input, or copy what it holds into this one",
            )
        )
    elif not target.exists():
        walk.rejections.append(
            Rejection(rel, "broken-link", "a link to nothing (its target is gone, or links loop)")
        )
    else:
        walk.ignored.append(Ignored(rel, LINK_INSIDE))


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path != root else "."


def _why(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__
