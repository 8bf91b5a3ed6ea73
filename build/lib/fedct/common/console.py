"""Where fedct's console output goes, and how much of it there is.

- :data:`out` (stdout) carries summaries: tables, result lines, the next commands to run;
  :data:`err` (stderr) carries progress bars, notes, warnings and errors.  Both soft-wrap:
  a long line (a path, a message) stays one line in a log file instead of being broken at
  80 columns mid-phrase.
- :func:`configure_logging` gives the root logger fedct's one handler before any command
  runs: warnings by default, fedct's own ``fedct.*`` loggers at INFO, everything down to
  DEBUG with ``--verbose``.  Flower's logger keeps its own handler and stops passing records
  on to the root logger, so that none is printed twice.
- :func:`import_quietly` imports a module that configures the root logger as a side effect
  (opacus calls ``logging.basicConfig`` on import) and undoes that, so that a dependency
  never decides how fedct's processes log.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from rich.console import Console

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

FEDCT_LOGGER = "fedct"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_DATE = "%Y-%m-%d %H:%M:%S"


class _Handler(logging.StreamHandler):
    """fedct's handler on the root logger (on the ``sys.stderr`` of when it was made)."""


def configure_logging(verbose: bool = False) -> None:
    """Point the root logger at stderr: WARNING and up, fedct's own loggers from INFO, and
    everything from DEBUG when ``verbose`` (including Flower's DEBUG lines)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(handler)
    handler = _Handler()
    handler.setFormatter(logging.Formatter(_FORMAT, _DATE))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger(FEDCT_LOGGER).setLevel(logging.DEBUG if verbose else logging.INFO)
    flower = logging.getLogger("flwr")
    flower.propagate = False
    for flower_handler in flower.handlers:
        flower_handler.setLevel(logging.DEBUG if verbose else logging.INFO)


def import_quietly(name: str) -> ModuleType:
    """``importlib.import_module(name)``, with the root logger's handlers and level as they
    were before: whatever the import configured there is removed."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return importlib.import_module(name)
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)


@contextmanager
def flower_lines_hidden() -> Iterator[None]:
    """Flower's console handlers at WARNING within the block (unless ``--verbose`` set them to
    DEBUG).  For runs in fedct's own process (``fedct train``, the demo's baselines): they print
    a line per round, which the INFO lines logged through Flower's logger would repeat."""
    handlers = [h for h in logging.getLogger("flwr").handlers if h.level > logging.DEBUG]
    levels = [h.level for h in handlers]
    for handler in handlers:
        handler.setLevel(max(handler.level, logging.WARNING))
    try:
        yield
    finally:
        for handler, level in zip(handlers, levels, strict=True):
            handler.setLevel(level)
