"""``fedct prepare``: a site's raw scans → a de-identified, model-ready cache + QA report.

Steps: read headers (no pixels), label every scan, reject what cannot be used (each with one
reason code), decode only the middle slices, normalise, resize, write one uint8 file per
scan, then the manifest with patient-level splits and the QA report.  Rejected inputs never
stop the run; re-running on the same cache reuses what is there and keeps earlier scans.

A scan is reused only when its file is whole (its size and sha256 as recorded when it was
written, common/cache/scan_index.py); a damaged one is prepared again, and the summary says how
many were.  Ctrl-C, SIGTERM and SIGHUP stop with one line (common/stop_signals.py); the
scans finished by then are recorded, so the rerun resumes from them.

One ``prepare`` writes a cache at a time (common/cache/lock.py).  Every setting is checked
before anything is written, and the settings a cache records are binding only once it holds
scans, so a refused or failed first attempt never blocks the corrected one.  A patient's
split never moves (common/cache/splits.py); a scan of this input that is no longer labelled,
or now rejected, leaves the manifest and the cache, and prepare says so.  A reader failing
on one scan in a way no rule foresaw rejects that scan (``reader-error``), never the run; a
full disk stops it with one line naming the file being written.
"""

from __future__ import annotations

import argparse
import errno
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from fedct.common.cache.config import PrepareConfig, differing_settings
from fedct.common.cache.lock import cache_writer
from fedct.common.cache.lung_mask import (
    cache_slices,
    has_lung_mask,
    mask_flags,
    mask_path,
    with_mask_flags,
    write_lung_mask,
)
from fedct.common.cache.normalize import Normalization, parse_normalization
from fedct.common.cache.pseudonym import load_or_create_salt, pseudonym
from fedct.common.cache.qa import QACollector, lung_share, plural, print_summary, scan_hu_counts
from fedct.common.cache.scan_index import ScanIndex, ScanRecord
from fedct.common.cache.selection import middle_slices
from fedct.common.cache.splits import parse_fractions, split_of, split_record
from fedct.common.cache.store import (
    CacheError,
    read_manifest,
    read_settings,
    scan_path,
    write_manifest,
    write_scan,
    write_settings,
)
from fedct.common.classes import GLOBAL_CLASSES, LabelMapError, load_label_map, to_global
from fedct.common.console import err, out
from fedct.common.ingest.base import Ignored, Rejection, Scan, ScanLoadError
from fedct.common.ingest.discover import LABELS_FILE, read_input
from fedct.common.ingest.labels import LabelsError, LabelTable
from fedct.common.ingest.pool import forked_pool
from fedct.common.ingest.voxels import brief, read_checked
from fedct.common.stop_signals import exit_status, stopped_by

console = err
SPLIT_RECORD = "split"  # cache.json: how the cache is split (common/cache/splits.py)


@dataclass
class PrepareResult:
    rows: list[dict[str, Any]]
    rejections: list[Rejection]
    reused: int
    seconds: float
    ignored: list[Ignored] = field(default_factory=list)  # files that are not inputs
    regenerated: int = 0  # reused scans whose file was damaged, prepared again
    removed: dict[str, int] = field(default_factory=dict)  # reason -> scans left the manifest
    moved: int = 0  # scans whose split changed (a cache split by an older rule)


class PrepareInterrupted(Exception):
    """Ctrl-C: ``done`` of ``pending`` conversions finished and are kept for the rerun."""

    def __init__(self, done: int, pending: int) -> None:
        super().__init__(f"{done} of {pending}")
        self.done = done
        self.pending = pending


# Set in the parent before forking workers, so scans (with their open readers) need no pickling.
_PENDING: list[tuple[Scan, dict[str, Any]]] = []
_JOB: dict[str, Any] = {}


def _convert(index: int) -> tuple[dict[str, Any], ScanRecord | Rejection]:
    """(row, its scan file's record) or, when the scan cannot be used, (row, rejection)."""
    scan, row = _PENDING[index]
    start, stop = row["selected_start"], row["selected_start"] + row["n_slices_selected"]
    try:
        hu, repaired = read_checked(scan, start, stop)
        pixels, mask, lungs = cache_slices(
            hu,
            _JOB["norm"],
            scan.intensity,
            _JOB["size"],
            pixel_mm=scan.spacing_mm[2],
            focus=_JOB["focus"],
        )
    except ScanLoadError as exc:  # the whole scan is rejected: all its files
        failed = exc.rejection
        return row, Rejection(failed.path, failed.reason, failed.detail, scan.files)
    except Exception as exc:  # a reader failing in a way no rule foresaw: this scan only
        return row, Rejection(scan.source, "reader-error", brief(exc), scan.files)
    if repaired:
        row = {**row, "warnings": ";".join(w for w in (row["warnings"], *repaired) if w)}
    write_lung_mask(_JOB["cache"], row["scan_id"], mask)
    blob = write_scan(_JOB["cache"], row["scan_id"], pixels)
    warnings = with_mask_flags(row["warnings"], lungs.warnings)
    row = {**row, **scan_hu_counts(scan, hu), **lung_share(lungs), "warnings": warnings}
    return row, ScanRecord.of_blob(row["scan_id"], blob)


def _row_for(
    scan: Scan, label: str | None, global_class: str | None, salt: bytes, cfg: PrepareConfig
) -> dict[str, Any]:
    start, stop = middle_slices(scan.n_slices, cfg.fraction)
    z, y, x = scan.spacing_mm
    return {
        "scan_id": pseudonym(salt, "scan", scan.study_key, scan.series_key),
        "patient_id": pseudonym(salt, "patient", scan.patient_key),
        "label": label or "",
        "global_class": global_class or "",
        "class_index": GLOBAL_CLASSES.index(global_class) if global_class else -1,
        "n_slices_total": scan.n_slices,
        "n_slices_selected": stop - start,
        "selected_start": start,
        "spacing_z_mm": _fmt(z),
        "spacing_y_mm": _fmt(y),
        "spacing_x_mm": _fmt(x),
        "thickness_mm": _fmt(scan.thickness_mm),
        "manufacturer": scan.manufacturer,
        "format": scan.format,
        "severity": scan.extra.get("severity", ""),
        "warnings": ";".join(scan.warnings),
    }


def _fmt(value: float | None) -> str:
    return "" if value is None or value != value else f"{value:.4g}"


def prepare(
    input_dir: Path,
    cache_dir: Path,
    cfg: PrepareConfig,
    *,
    labels: Path | None = None,
    label_map: Path | None = None,
    progress: bool = True,
    qa_report: bool = True,
) -> PrepareResult:
    """Prepare ``input_dir`` into ``cache_dir``, holding the cache's writer lock
    (common/cache/lock.py); raises only for unusable arguments or cache (before writing
    anything), a cache another process is writing, a failed write (a full disk), or Ctrl-C.
    ``qa_report=False`` leaves out qa.json and qa.html (a temporary cache nobody reads)."""
    norm = parse_normalization(cfg.normalize)
    mapping = load_label_map(label_map)
    table = LabelTable.load(labels) if labels else None
    if not Path(input_dir).is_dir():
        raise FileNotFoundError(f"{input_dir}: input folder does not exist")
    with cache_writer(Path(cache_dir)):
        return _prepare(
            Path(input_dir), Path(cache_dir), cfg, norm, mapping, table, labels, progress, qa_report
        )


def _prepare(
    input_dir: Path,
    cache_dir: Path,
    cfg: PrepareConfig,
    norm: Normalization,
    mapping: dict[str, str],
    table: LabelTable | None,
    labels: Path | None,
    progress: bool,
    qa_report: bool,
) -> PrepareResult:
    began = time.perf_counter()
    existing = _existing_rows(cache_dir)
    index = ScanIndex(cache_dir)
    _record_settings(cache_dir, cfg, bool(existing or index.records) or _has_scans(cache_dir))
    salt = load_or_create_salt(cache_dir)
    damaged = 0

    rejections: list[Rejection] = []
    pending: list[tuple[Scan, dict[str, Any]]] = []
    rows: dict[str, dict[str, Any]] = dict(existing)
    rejected_ids: dict[str, str] = {}  # scans of this input rejected: scan id -> reason
    # Pseudonym -> raw patient ID, in memory only: the split follows the data, not the salt.
    split_keys: dict[str, str] = {}
    reused = 0
    collected = QACollector()
    items = read_input(
        Path(input_dir), cfg.format, progress=progress, labels=labels, workers=cfg.workers
    )
    for item in items:
        if isinstance(item, Ignored):
            collected.ignored.append(item)
            continue
        if isinstance(item, Rejection):
            rejections.append(item)
            continue
        label = table.label_of(item) if table else item.label
        global_class = to_global(label, mapping) if label else None
        problem = _scan_problem(item, table, label, global_class, cfg)
        if problem is not None:
            rejections.append(problem)
            rejected_ids[pseudonym(salt, "scan", item.study_key, item.series_key)] = problem.reason
            continue
        row = _row_for(item, label, global_class, salt, cfg)
        split_keys[row["patient_id"]] = item.patient_key
        collected.add_scan(item, row)
        problem = index.problem(row["scan_id"])
        if problem is None and not has_lung_mask(cache_dir, row["scan_id"]):
            problem = "missing"  # prepared before lung masks were: prepared again
        if problem is None:
            index.adopt(row["scan_id"])
            earlier = existing.get(row["scan_id"], {})
            flags = mask_flags(earlier.get("warnings", ""))
            rows[row["scan_id"]] = {
                **earlier,
                **row,
                "warnings": with_mask_flags(row["warnings"], flags),
            }
            reused += 1
        else:
            damaged += problem != "missing"
            pending.append((item, row))
    if damaged:
        console.print(
            f"[yellow]warning:[/yellow] {damaged} cached scans are damaged (truncated, or "
            "another checksum than when written): preparing them again",
            highlight=False,
        )

    _PENDING[:] = pending
    _JOB.update(norm=norm, cache=cache_dir, size=cfg.size, focus=cfg.lung_focus)
    done = 0
    try:
        for row, outcome in _run_conversions(len(pending), cfg.workers, progress):
            if isinstance(outcome, Rejection):
                rejections.append(outcome)
                rejected_ids[row["scan_id"]] = outcome.reason
            else:
                index.append(outcome)
                rows[row["scan_id"]] = collected.add_converted(row)
            done += 1
    except KeyboardInterrupt:
        raise PrepareInterrupted(done, len(pending)) from None
    finally:
        _PENDING.clear()
        _remove_temporaries(cache_dir)

    removed = _remove_rejected(cache_dir, rows, existing, rejected_ids)
    ordered = sorted(rows.values(), key=lambda r: r["scan_id"])
    moved = _assign_splits(ordered, split_keys, existing, cfg)
    write_manifest(cache_dir, ordered)
    index.compact({row["scan_id"] for row in ordered})
    seconds = time.perf_counter() - began
    if qa_report:
        collected.write(cache_dir, ordered, rejections, salt, cfg, seconds, norm)
    return PrepareResult(
        ordered, rejections, reused, seconds, collected.ignored, damaged, removed, moved
    )


def _scan_problem(
    scan: Scan,
    table: LabelTable | None,
    label: str | None,
    global_class: str | None,
    cfg: PrepareConfig,
) -> Rejection | None:
    """Why a scan the reader found cannot go into the cache (its label, its length)."""
    if table is not None and label is None:
        return scan.rejected("missing-label")
    if label is not None and global_class is None:
        return scan.rejected("unknown-label", f"label {label!r}")
    if scan.n_slices < cfg.min_slices:
        return scan.rejected("too-few-slices", f"{scan.n_slices} < {cfg.min_slices}")
    return None


def _has_scans(cache_dir: Path) -> bool:
    return any((cache_dir / "scans").glob("*.npy"))


def _record_settings(cache_dir: Path, cfg: PrepareConfig, holds_scans: bool) -> None:
    """Record the settings the cache is prepared with.  Once it holds scans they are
    binding: other pixel settings would mix two kinds of scans, another seed or other
    fractions would move patients between splits.  Before that (a first attempt that was
    refused or failed) new settings simply replace them."""
    wanted = {**cfg.cache_settings(), SPLIT_RECORD: split_record(cfg.splits, cfg.seed)}
    previous = read_settings(cache_dir)
    if previous is not None and holds_scans:
        mismatch = differing_settings(previous, cfg.cache_settings())
        if mismatch:
            raise CacheError(
                f"{cache_dir}: prepared with other settings "
                + ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in mismatch.items())
                + "; use a new --out folder"
            )
        split = previous.get(SPLIT_RECORD)
        if split is not None and split != wanted[SPLIT_RECORD]:
            raise CacheError(
                f"{cache_dir}: split with seed {split.get('seed')} and fractions "
                f"{','.join(f'{f:g}' for f in split.get('fractions', []))}; --seed {cfg.seed} "
                f"--splits {','.join(f'{f:g}' for f in cfg.splits)} would move patients "
                "between splits (a model could be tested on scans it trained on); use a new "
                "--out folder"
            )
    write_settings(cache_dir, wanted)


def _remove_rejected(
    cache_dir: Path,
    rows: dict[str, dict[str, Any]],
    existing: dict[str, dict[str, str]],
    rejected_ids: dict[str, str],
) -> dict[str, int]:
    """Take the scans of this input that were rejected this time out of ``rows`` and the
    cache (a patient no longer in labels.csv, a scan a reader now refuses); say so and
    return how many per reason.  Scans of earlier inputs that this one does not hold stay."""
    removed: dict[str, int] = {}
    for scan_id, reason in rejected_ids.items():
        if scan_id in existing and rows.pop(scan_id, None) is not None:
            scan_path(cache_dir, scan_id).unlink(missing_ok=True)
            mask_path(cache_dir, scan_id).unlink(missing_ok=True)
            removed[reason] = removed.get(reason, 0) + 1
    if removed:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(removed.items()))
        console.print(
            f"[yellow]warning:[/yellow] removed {plural(sum(removed.values()), 'scan')} of "
            f"this input from the cache and its manifest, now rejected ({reasons}); they are "
            "no longer trained on or scored",
            highlight=False,
        )
    return removed


def _assign_splits(
    rows: list[dict[str, Any]],
    split_keys: dict[str, str],
    existing: dict[str, dict[str, str]],
    cfg: PrepareConfig,
) -> int:
    """Give every row its split (common/cache/splits.py): a scan of this input by its
    patient's raw ID, a scan kept from an earlier input its recorded one.  Returns how many
    scans changed split, which only a cache split by an older fedct's rule can have (then
    it says so)."""
    moved = 0
    for row in rows:
        key = split_keys.get(row["patient_id"])
        if key is not None or not row.get("split"):
            row["split"] = split_of(key or row["patient_id"], cfg.splits, cfg.seed)
        before = existing.get(row["scan_id"], {}).get("split")
        moved += before is not None and before != row["split"]
    if moved:
        console.print(
            f"[yellow]warning:[/yellow] {plural(moved, 'scan')} changed split: this cache was "
            "split by an older fedct, whose splits moved patients when others were added; "
            "from now on no patient moves",
            highlight=False,
        )
    return moved


def _existing_rows(cache_dir: Path) -> dict[str, dict[str, str]]:
    """The rows of the cache's manifest; none (with a warning) when it is damaged, since the
    rerun writes it anew from the input."""
    if not (cache_dir / "manifest.csv").exists():
        return {}
    try:
        return {row["scan_id"]: row for row in read_manifest(cache_dir)}
    except CacheError as exc:
        console.print(f"[yellow]warning:[/yellow] {exc}: writing it anew from this input")
        return {}


def _remove_temporaries(cache_dir: Path) -> None:
    """Half-written scans of workers stopped by Ctrl-C (atomic_open's temporary names)."""
    for tmp in (cache_dir / "scans").glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def _run_conversions(count: int, workers: int, progress: bool):
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("decoding selected slices", total=count)
        if workers <= 1 or count <= 1:
            results = map(_convert, range(count))
            for result in results:
                bar.advance(task)
                yield result
            return
        with forked_pool(min(workers, count)) as pool:
            for result in pool.imap_unordered(_convert, range(count)):
                bar.advance(task)
                yield result


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    return PrepareConfig(
        size=args.size,
        fraction=args.fraction,
        normalize=args.normalize,
        min_slices=args.min_slices,
        splits=parse_fractions(args.splits),
        seed=args.seed,
        format=args.format,
        lung_crop=args.lung_crop,
        lung_only=args.lung_only,
        workers=args.workers,
    )


def warn_unlabelled(rows: list[dict[str, Any]], input_dir: Path) -> None:
    """Say on stderr, loudly, that scans without a label cannot be trained on, and how to
    give labels (prepare was run without --labels)."""
    unlabelled = sum(int(row["class_index"]) < 0 for row in rows)
    if not unlabelled:
        return
    share = "all" if unlabelled == len(rows) else f"{unlabelled} of {len(rows)}"
    lines = [
        f"[bold yellow]warning:[/bold yellow] no --labels was given and the folder layout "
        f"gives no label for {share} scans: they are unlabelled, and unlabelled scans are "
        "never trained on (only scored).",
        "  Give the labels as a CSV with a label column and one of series_uid, study_uid, "
        "path or patient_id (docs/ingestion.md):",
        f"  fedct prepare --input {escape(str(input_dir))} --out CACHE --labels labels.csv",
    ]
    if (input_dir / LABELS_FILE).is_file():
        found = escape(str(input_dir / LABELS_FILE))
        lines.append(f"  {found} exists: pass --labels {found}")
    for line in lines:
        err.print(line, highlight=False)


def interrupted_line(stop: PrepareInterrupted, cache_dir: Path) -> str:
    """The one line that ends a prepare stopped by Ctrl-C, SIGTERM or SIGHUP."""
    return (
        f"interrupted ({stopped_by()}): {stop.done} of {stop.pending} scans to convert were "
        f"finished and are kept in {cache_dir}; run the same command again to resume"
    )


def write_error(exc: OSError, cache_dir: Path) -> str:
    """The line for a write that failed (a full disk names the file and the disk)."""
    where = exc.filename or cache_dir
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"{where}: {exc.strerror}: the disk of {cache_dir} is full; free space there and "
            "run the same command again (the scans finished are kept)"
        )
    return f"{where}: {exc.strerror or exc}"


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        result = prepare(args.input, args.out, cfg, labels=args.labels, label_map=args.label_map)
    except (ValueError, FileNotFoundError, CacheError, LabelsError, LabelMapError) as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        return 2
    except PrepareInterrupted as stop:
        console.print(interrupted_line(stop, Path(args.out)), highlight=False)
        return exit_status()
    except KeyboardInterrupt:
        console.print(
            f"interrupted ({stopped_by()}) before any scan was converted; run the same "
            "command again",
            highlight=False,
        )
        return exit_status()
    except OSError as exc:
        console.print(f"[red]error:[/red] {write_error(exc, Path(args.out))}", highlight=False)
        return 1
    print_summary(args.out, out)
    usable = len(result.rows)
    files = sum(len(r.files) for r in result.rejections)
    again = f", {result.regenerated} damaged ones prepared again" if result.regenerated else ""
    out.print(
        f"prepared {plural(usable, 'scan')} ({result.reused} reused{again}), rejected "
        f"{plural(len(result.rejections), 'input')} ({plural(files, 'file')}), ignored "
        f"{plural(len(result.ignored), 'file')} in {result.seconds:.1f} s → {args.out}; "
        f"details in {Path(args.out) / 'qa.html'}",
        highlight=False,
    )
    if args.labels is None:
        warn_unlabelled(result.rows, Path(args.input))
    if usable == 0 or (args.strict and result.rejections):
        return 1
    return 0
