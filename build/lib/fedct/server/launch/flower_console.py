"""A ``flwr run --stream`` whose console shows fedct's lines and keeps Flower's in a file.

Flower's stream mixes the ServerApp's log with the simulated sites' logs, Ray's warnings and
Flower's own notices, hundreds of lines for a short run.  :func:`run_flower` writes all of it,
without colour codes, to a log file, and shows only the progress lines of
server/progress.py: a round's line on stdout, a failed site's on stderr.  With ``verbose``
it also passes the whole stream through to stderr as it comes.  When the run fails,
:func:`failure_excerpt` is what to show of the log: its errors and tracebacks.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedct.common.console import err, out
from fedct.server.progress import PROGRESS

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
RECORD = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s*(.*)$")
RUN_STARTED = re.compile(r"Successfully started run (\d+)")
ERROR_START = re.compile(r"^(ERROR|CRITICAL)\b|Traceback \(most recent call last\)")


@dataclass(frozen=True)
class FlowerRun:
    returncode: int
    run_id: int | None  # the Flower run id, once ``flwr run`` has printed it


def shown_line(text: str) -> tuple[str, str] | None:
    """("info" | "warning", message) when a stream line (colour codes removed) is one of
    the ServerApp's progress lines; None for everything else (sites' lines included: those
    start with the Ray actor's name)."""
    match = RECORD.match(text)
    if match is None or not PROGRESS.match(match.group(2)):
        return None
    return ("info" if match.group(1) == "INFO" else "warning"), match.group(2)


def run_flower(
    command: list[str],
    env: dict[str, str],
    log_path: Path,
    *,
    verbose: bool = False,
    on_run_id: Callable[[int], None] | None = None,
) -> FlowerRun:
    """Run ``command`` (a ``flwr run ... --stream``), appending its output to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    run_id = None
    with (
        open(log_path, "a", encoding="utf-8") as log,
        subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            bufsize=1,
        ) as process,
    ):
        try:
            assert process.stdout is not None
            for raw in process.stdout:
                if verbose:
                    sys.stderr.write(raw)
                text = ANSI.sub("", raw).rstrip("\n")
                log.write(text + "\n")
                log.flush()
                if run_id is None and (started := RUN_STARTED.search(text)):
                    run_id = int(started.group(1))
                    if on_run_id is not None:
                        on_run_id(run_id)
                shown = shown_line(text)
                if shown is not None and shown[0] == "info":
                    out.print(shown[1], markup=False, highlight=False)
                elif shown is not None and not verbose:  # verbose: already on stderr
                    err.print(f"warning: {shown[1]}", markup=False, highlight=False)
            returncode = process.wait()
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait()
    return FlowerRun(returncode, run_id)


def failure_excerpt(log_path: Path, limit: int = 30) -> list[str]:
    """What a failed run's log says went wrong: from the start of its last cluster of ERROR
    lines and tracebacks to the end of the log, at most ``limit`` lines (its first few and,
    after a "…", its last), else the log's last 15 lines."""
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    starts = [i for i, line in enumerate(lines) if ERROR_START.search(line)]
    if not starts:
        return lines[-15:]
    first = starts[-1]
    for start in reversed(starts):  # chained tracebacks and their ERROR headers
        if start >= first - limit:
            first = start
    excerpt = lines[first:]
    if len(excerpt) > limit:
        excerpt = [*excerpt[:5], "…", *excerpt[-(limit - 6) :]]
    return excerpt
