"""``fedct diagnose``: new, unlabelled chest-CT studies → probabilities, a decision, its evidence.

For each study of ``--input`` (a DICOM folder with one or many studies, a zip, a NIfTI file or
folder, a slice-image folder) it writes into ``--out`` only: ``diagnoses.json`` and
``diagnoses.csv`` (one entry per study), ``index.html`` and a page per study with the
class-activation overlay on each selected slice (client/evaluator/diagnosis_page.py).  Every
study gets a result or the reason it has none: the series chosen and why, the series and
files rejected, as ``fedct inspect`` explains them.

The scans are prepared exactly as ``fedct evaluate`` prepares a raw folder and scored by the
same function (:func:`~fedct.client.evaluator.evaluate.prepared_raw`,
:func:`~fedct.client.evaluator.evaluate.score_scans`), so a scan gets the same probabilities
from both.  The study's identifiers and pixels go to ``--out`` alone: the temporary cache lies
inside it and is removed, and what is printed names studies by their number only.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from rich.markup import escape

from fedct.client.evaluator import diagnosis_page
from fedct.client.evaluator.evaluate import UNTUNED, prepared_raw, score_scans
from fedct.client.evaluator.study_input import InputError, Limits, input_folder, scan_id
from fedct.common.cache.dataset import CacheDataset, to_model_input
from fedct.common.cache.lung_mask import read_lung_mask
from fedct.common.cache.pseudonym import load_or_create_salt
from fedct.common.cache.store import CacheError, atomic_open, scan_path
from fedct.common.classes import COVID_INDEX, GLOBAL_CLASSES, LabelMapError
from fedct.common.console import err
from fedct.common.console import out as stdout
from fedct.common.ingest.base import Ignored, Rejection, Scan, ScanLoadError
from fedct.common.ingest.discover import detect_format, read_input
from fedct.common.ingest.walk import walk_input
from fedct.common.metrics.operating_point import OperatingPoint
from fedct.common.model.cam import class_activation_maps
from fedct.common.model.inference_engine import scoring_model
from fedct.common.run.directory import CheckpointLoadError, jsonable
from fedct.common.run.load import (
    load_checkpoint,
    operating_point_from_card,
    prepare_settings_from_card,
)
from fedct.common.training.device import DeviceError, pick_device

OUTPUTS = ("diagnoses.json", "diagnoses.csv", "index.html")
CSV_FIELDS = (
    "study_number",
    "study",
    "source",
    "status",
    "reason",
    *(f"p_{name}" for name in GLOBAL_CLASSES),
    "called_covid19",
    "threshold",
    "qa",
    "page",
)
FEW_SLICES = 40  # fewer slices than a chest CT at 10 mm spacing: little evidence to pool
THICK_MM = 5.0  # ai-corona's scans were 1-5 mm; thicker slices blur small opacities
AIR_HU = -900.0  # a chest CT always holds air below this (outside the body, in the lungs)
HIGH_HU = 3000.0  # above dense bone; metal or a wrong rescale
PHASES = ("read", "prepare", "score", "cam", "write")

Progress = Callable[[str, float], None]  # (what is being done, share of the study done)


@dataclass
class Outcome:
    """What diagnosing one input gave: one entry per study, the inputs no study owns, and
    the seconds each phase took."""

    studies: list[dict[str, Any]]
    unassigned: list[dict[str, Any]]
    ignored: int
    seconds: dict[str, float] = field(default_factory=dict)


class Diagnoser:
    """A model ready to diagnose: loaded and its sha256 checked, compiled for ``engine``, its
    card's operating point read.  The viewer keeps one for its whole life."""

    def __init__(
        self,
        model: Path,
        *,
        engine: str = "auto",
        device: str = "auto",
        slice_chunk: int | None = None,
        export_cache: Path | None = None,
    ) -> None:
        self.loaded = load_checkpoint(model, slice_chunk=slice_chunk)
        card, card_path = self.loaded.card, self.loaded.card_path
        self.settings, self.missing = prepare_settings_from_card(card, card_path)
        self.device = pick_device(device)
        self.scorer, self.engine = scoring_model(
            self.loaded.model,
            engine,
            self.device,
            int(self.settings["size"]),
            cache_dir=export_cache,
        )
        stored = operating_point_from_card(card, card_path)
        self.tuned = stored is not None
        self.op = stored or OperatingPoint(0.5, "fixed", UNTUNED, math.nan, math.nan)
        self.model_info = {
            "checkpoint": self.loaded.weights_path.name,
            "card": card_path.name,
            "sha256": self.loaded.sha256,
            "run": card.get("run"),
            "round": self.loaded.round,
            "backbone": self.loaded.config.backbone,
            "cache_settings": self.settings,
            "settings_assumed": list(self.missing),
            "engine": self.engine,
        }

    def diagnose(
        self,
        root: Path,
        out: Path,
        *,
        fmt: str = "auto",
        workers: int = 1,
        batch_size: int = 1,
        progress: Progress | None = None,
    ) -> Outcome:
        """Diagnose every study of the folder ``root``; write every output into ``out``."""
        tell = progress or (lambda what, share: None)
        clock = _Clock()
        tell("reading headers", 0.0)
        if fmt == "auto":
            fmt = detect_format(walk_input(root).files)
        items = list(read_input(root, fmt, workers=workers))
        scans = [item for item in items if isinstance(item, Scan)]
        clock.lap("read")
        tell("preparing the selected slices", 0.1)
        work = out / ".work"
        work.mkdir(parents=True, exist_ok=True)
        with prepared_raw(
            root, self.settings, fmt=fmt, workers=workers, parent=work, progress=False
        ) as (cache_dir, prepared):
            clock.lap("prepare")
            salt = load_or_create_salt(cache_dir)
            rows = {row["scan_id"]: row for row in prepared.rows}
            tell("scoring", 0.4)
            dataset = CacheDataset(cache_dir, unlabelled=True)
            scored = (
                score_scans(self.scorer, dataset, batch_size, self.device, self.loaded.temperature)
                if len(dataset)
                else None
            )
            clock.lap("score")
            studies, unassigned = _group(root, fmt, scans, prepared.rejections)
            results = []
            ordered = sorted(studies.items(), key=lambda item: (item[1].source(), item[0]))
            for number, (key, group) in enumerate(ordered, start=1):
                chosen = [s for s in group.scans if scan_id(salt, s) in rows]
                entry = self._entry(number, key, group, chosen, salt, rows, scored)
                clock.lap("prepare")  # the QA check decodes the middle slice again
                if chosen and scored is not None:
                    share = 0.5 + 0.45 * (number - 1) / max(len(studies), 1)
                    tell(f"evidence maps of study {number} of {len(studies)}", share)
                    self._evidence(entry, cache_dir, scan_id(salt, chosen[0]), out, clock)
                results.append(entry)
        shutil.rmtree(work, ignore_errors=True)
        outcome = Outcome(results, unassigned, sum(isinstance(i, Ignored) for i in items))
        tell("writing the pages", 0.95)
        self._write(outcome, out, root.name)
        clock.lap("write")
        outcome.seconds = clock.seconds
        tell("done", 1.0)
        return outcome

    def _entry(
        self,
        number: int,
        key: str,
        group: _Study,
        chosen: list[Scan],
        salt: bytes,
        rows: dict[str, dict[str, Any]],
        scored: Any,
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "number": number,
            "study": key,
            "source": group.source(),
            "status": "not diagnosed",
            "reason": None,
            "series": None,
            "rejected": [_rejection(r) for r in group.rejections],
            "probabilities": None,
            "most_likely": None,
            "decision": None,
            "qa": [],
            "model": self.model_info,
            "page": diagnosis_page.study_page_name(number),
        }
        if not chosen:
            entry["reason"] = _reason(group)
            return entry
        scan = chosen[0]
        row = rows[scan_id(salt, scan)]
        index = scored.scan_ids.index(row["scan_id"])
        probs = scored.probs[index]
        called = bool(self.op.predict_covid(probs[None])[0])
        entry.update(
            status="diagnosed",
            source=scan.source,
            series=_series(scan, row, group),
            probabilities={name: float(p) for name, p in zip(GLOBAL_CLASSES, probs, strict=True)},
            most_likely=GLOBAL_CLASSES[int(probs.argmax())],
            decision=self._decision(float(probs[COVID_INDEX]), called),
            qa=quality_warnings(scan, row),
        )
        return entry

    def _decision(self, p_covid: float, called: bool) -> dict[str, Any]:
        op = self.op
        return {
            "called_covid19": called,
            "label": "COVID-19" if called else "not COVID-19",
            "threshold": op.threshold,
            "rule": op.rule,
            "chosen_on": op.chosen_on,
            "tune_sensitivity": None if math.isnan(op.sensitivity) else op.sensitivity,
            "tune_specificity": None if math.isnan(op.specificity) else op.specificity,
            "tuned": self.tuned,
            "meaning": decision_meaning(op, p_covid, called, self.tuned),
        }

    def _evidence(
        self, entry: dict[str, Any], cache_dir: Path, scan: str, out: Path, clock: _Clock
    ) -> None:
        """The COVID-19 evidence map of every selected slice (common/model/cam.py, the maps and
        scale of ``fedct evaluate``'s report, at the card's temperature), with the lung mask
        ``prepare`` computed for the scan outlined, written beside the study's page as a plain
        and an evidence picture per slice.  The maps take gradients, so they come from the
        eager model, not a compiled scorer."""
        pixels = np.load(scan_path(cache_dir, scan))
        try:
            cams = class_activation_maps(
                self.loaded.model,
                to_model_input(pixels),
                COVID_INDEX,
                temperature=self.loaded.temperature,
            )
        except ValueError as exc:  # a backbone without spatial feature maps
            entry["qa"].append(f"no evidence maps: {exc}")
            cams = None
        lungs = read_lung_mask(cache_dir, scan, pixels.shape)
        clock.lap("cam")
        entry["slices"] = diagnosis_page.write_slices(out, entry["number"], pixels, cams, lungs)
        clock.lap("write")

    def _write(self, outcome: Outcome, out: Path, input_name: str) -> None:
        document = jsonable(
            {
                "input": input_name,
                "model": self.model_info,
                "operating_point": {**self.op.to_dict(), "tuned": self.tuned},
                "studies": outcome.studies,
                "unassigned": outcome.unassigned,
                "ignored_files": outcome.ignored,
            }
        )
        with atomic_open(out / "diagnoses.json") as handle:
            json.dump(document, handle, indent=2, allow_nan=False)
            handle.write("\n")
        with atomic_open(out / "diagnoses.csv") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_FIELDS)
            writer.writerows(_csv_row(study) for study in document["studies"])
        diagnosis_page.write_pages(out, document)


class _Clock:
    """Seconds per phase, summed over every time a phase runs."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] += now - self._last
        self._last = now


@dataclass
class _Study:
    """A study's scans (the chosen series) and the rejections that belong to it."""

    scans: list[Scan] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)

    def source(self) -> str:
        """The deepest folder (or the file) that holds every input of the study."""
        return _common_source([s.source for s in self.scans] + [r.path for r in self.rejections])


def _group(
    root: Path, fmt: str, scans: list[Scan], rejections: list[Rejection]
) -> tuple[dict[str, _Study], list[dict[str, Any]]]:
    """Scans and rejections by study (a DICOM rejection by the StudyInstanceUID of its first
    file; a NIfTI or image input is its own study); the rejections no study owns."""
    studies: dict[str, _Study] = defaultdict(_Study)
    by_source = {}
    for scan in scans:
        studies[scan.study_key].scans.append(scan)
        by_source[scan.source] = scan.study_key
    dicom = fmt == "dicom"
    unassigned = []
    for rejection in rejections:
        key = by_source.get(rejection.path)
        if key is None and dicom:
            key = _dicom_study(root / rejection.files[0])
        if key is None and not dicom:
            key = rejection.path
        if key is None:
            unassigned.append(_rejection(rejection))
        else:
            studies[key].rejections.append(rejection)
    return studies, unassigned


def _dicom_study(path: Path) -> str | None:
    """The StudyInstanceUID in a file's header, or None when it has none or is no DICOM."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        uid = str(header.get("StudyInstanceUID", "") or "")
    except Exception:  # any unreadable file: its rejection already says why
        return None
    return uid or None


def _rejection(rejection: Rejection) -> dict[str, Any]:
    return {
        "path": rejection.path,
        "reason": rejection.reason,
        "detail": rejection.detail,
        "files": len(rejection.files),
    }


def _reason(group: _Study) -> str:
    if not group.rejections:
        return "no usable scan"
    parts = [
        f"{r.path}: {r.reason}" + (f" ({r.detail})" if r.detail else "") for r in group.rejections
    ]
    return "no usable axial CT scan: " + "; ".join(parts)


def _common_source(paths: list[str]) -> str:
    """The deepest folder (or the file) that holds every path of a study."""
    if not paths:
        return ""
    parts = [Path(p).parts for p in paths]
    common = []
    for names in zip(*parts, strict=False):
        if len(set(names)) > 1:
            break
        common.append(names[0])
    return Path(*common).as_posix() if common else "."


def _series(scan: Scan, row: dict[str, Any], group: _Study) -> dict[str, Any]:
    others = [r for r in group.rejections if r.reason == "not-selected"]
    if others:
        why = (
            f"chosen by the series rule (docs/dicom.md: most slices among the axial CT series) "
            f"over {len(others)} other usable series"
        )
    elif scan.format == "dicom":
        why = "the study's only usable axial CT series"
    else:
        why = f"the {scan.format} volume itself"
    start = int(row["selected_start"])
    return {
        "uid": scan.series_key if scan.format == "dicom" else None,
        "number": scan.extra.get("series_number"),
        "format": scan.format,
        "why": why,
        "slices": scan.n_slices,
        "selected": [start, start + int(row["n_slices_selected"])],
        "spacing_mm": [round(v, 4) for v in scan.spacing_mm],
        "thickness_mm": scan.thickness_mm,
        "kernel": scan.extra.get("kernel"),
        "manufacturer": scan.manufacturer,
        "files": len(scan.files),
    }


def quality_warnings(scan: Scan, row: dict[str, Any]) -> list[str]:
    """What a reader of the result should know about the scan's quality: few or thick
    slices, odd Hounsfield values in its middle slice, the reader's own notes."""
    warnings = []
    if scan.n_slices < FEW_SLICES:
        warnings.append(
            f"few slices: {scan.n_slices} (the model pools {row['n_slices_selected']} of them)"
        )
    step = scan.thickness_mm or scan.spacing_mm[0]
    if step and step > THICK_MM:
        warnings.append(f"thick slices: {step:g} mm (small opacities may be missed)")
    warnings.extend(f"reader: {note}" for note in scan.warnings if note != "no-patient-id")
    if scan.intensity != "hu":
        warnings.append("slice images hold display values, not Hounsfield units")
        return warnings
    middle = int(row["selected_start"]) + int(row["n_slices_selected"]) // 2
    try:
        hu = scan.load(middle, middle + 1)
    except ScanLoadError:
        return warnings  # prepare decoded it; a second failure is no quality finding
    if float((hu < AIR_HU).mean()) < 0.01:
        warnings.append(
            f"odd HU range: no air below {AIR_HU:g} HU in the middle slice; the values may "
            "not be Hounsfield units (rescale missing?)"
        )
    if float(np.percentile(hu, 99.9)) > HIGH_HU:
        warnings.append(f"odd HU range: values above {HIGH_HU:g} HU (metal, or a wrong rescale)")
    return warnings


def decision_meaning(op: OperatingPoint, p_covid: float, called: bool, tuned: bool) -> str:
    """The decision in words: the threshold, and what it did on the data it was chosen on."""
    side = "≥" if called else "<"
    text = (
        f"p(COVID-19) {p_covid:.3f} {side} threshold {op.threshold:.3f}: "
        f"{'called COVID-19' if called else 'not called COVID-19'}."
    )
    if not tuned:
        return text + (
            " The model card stores no operating point: 0.5 is an arbitrary threshold, "
            "not tuned on any data, so the decision has no known sensitivity or specificity."
        )
    return text + (
        f" The threshold was chosen on {op.chosen_on or 'the sites tune data'} "
        f"({_rule_text(op)}); there it called {op.sensitivity:.0%} of the COVID-19 scans "
        f"COVID-19 (sensitivity) and {1 - op.specificity:.0%} of the others (specificity "
        f"{op.specificity:.2f})."
    )


def _rule_text(op: OperatingPoint) -> str:
    if op.rule == "sens_at_spec":
        return f"the highest sensitivity at specificity ≥ {op.min_specificity or 0:.2f}"
    if op.rule == "youden":
        return "the largest sensitivity + specificity"
    return "a fixed threshold"


def _csv_row(study: dict[str, Any]) -> list[Any]:
    probs = study["probabilities"] or {}
    decision = study["decision"] or {}
    return [
        study["number"],
        study["study"],
        study["source"],
        study["status"],
        study["reason"] or "",
        *(f"{probs[name]:.6f}" if probs else "" for name in GLOBAL_CLASSES),
        int(decision["called_covid19"]) if decision else "",
        f"{decision['threshold']:.6g}" if decision else "",
        "; ".join(study["qa"]),
        study["page"],
    ]


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:
        if args.batch_size < 1 or args.workers < 1:
            raise ValueError("--batch-size and --workers must be at least 1")
        out = Path(args.out)
        earlier = [name for name in OUTPUTS if (out / name).exists()]
        if earlier and not args.force:
            raise ValueError(
                f"{out}: holds earlier diagnoses ({', '.join(earlier)}); give --force to "
                "replace them, or another --out"
            )
        out.mkdir(parents=True, exist_ok=True)
        with input_folder(args.input, out / ".work", Limits()) as root:
            diagnoser = Diagnoser(
                args.model, engine=args.engine, device=args.device, slice_chunk=args.slice_chunk
            )
            diagnosis_page.clear(out)
            outcome = diagnoser.diagnose(
                root,
                out,
                fmt=args.format,
                workers=args.workers,
                batch_size=args.batch_size,
                progress=_printer(),
            )
    except (
        CheckpointLoadError,
        CacheError,
        LabelMapError,
        DeviceError,
        InputError,
        OSError,
        ValueError,
    ) as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        return 2
    _print_summary(outcome, args.out, time.perf_counter() - started)
    return 0 if any(s["status"] == "diagnosed" for s in outcome.studies) else 1


def _printer() -> Progress:
    last = [""]

    def show(what: str, share: float) -> None:
        if what != last[0]:
            err.print(f"[dim]{share:4.0%} {escape(what)}[/dim]", highlight=False)
            last[0] = what

    return show


def _print_summary(outcome: Outcome, out: Path, seconds: float) -> None:
    """One line per study, named by its number only (its identifiers stay in ``out``)."""
    for study in outcome.studies:
        if study["status"] == "diagnosed":
            p = study["probabilities"]["covid19"]
            line = f"study {study['number']}: {study['decision']['label']} (p(COVID-19) {p:.3f})"
            if study["qa"]:
                line += f", {len(study['qa'])} QA warning(s)"
        else:
            reasons = sorted({r["reason"] for r in study["rejected"]}) or ["no usable scan"]
            line = f"study {study['number']}: not diagnosed ({', '.join(reasons)})"
        stdout.print(escape(line), highlight=False)
    done = sum(s["status"] == "diagnosed" for s in outcome.studies)
    extra = f", {len(outcome.unassigned)} inputs of no study" if outcome.unassigned else ""
    phases = ", ".join(f"{k} {v:.1f}" for k, v in outcome.seconds.items())
    stdout.print(
        f"diagnosed {done} of {len(outcome.studies)} studies{extra} in {seconds:.1f} s "
        f"({phases} s) → {out / 'index.html'}",
        highlight=False,
    )
