"""Evaluate a model checkpoint on a cache or raw folder: predictions, metrics with CIs, report.

The model is rebuilt from its card and its weights' sha256 checked (common/run/load.py).
A raw folder is prepared into a temporary cache with the size, slice fraction and
normalisation the model was trained with; a cache prepared with other settings is refused.
The COVID-19 operating point is never chosen on the data being reported: it is the card's,
else chosen on ``--tune-data``, else a fixed 0.5 marked as not tuned.  Writes
predictions.csv, metrics.json and report.html (docs/evaluation.md); an --out folder that
holds an earlier evaluation is replaced only with ``--force``.  Data without labels is scored
and written to predictions.csv only (metrics need labels); on a raw folder predictions.csv
names each scan's source path and StudyInstanceUID, so that an evaluator can find a case.
:func:`score_scans` and :func:`prepared_raw` are the scoring and preparation that
``fedct diagnose`` shares.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from fedct.client.evaluator.report import UNTUNED, ci_text, render_report
from fedct.client.evaluator.study_input import ScanSource, scan_sources
from fedct.common import html_page
from fedct.common.cache.config import (
    ABSENT_MEANS,
    RUN_CONFIG_KEYS,
    PrepareConfig,
    differing_settings,
)
from fedct.common.cache.dataset import CacheDataset, make_loader, to_model_input
from fedct.common.cache.lung_mask import outline, read_lung_mask
from fedct.common.cache.prepare import PrepareResult, prepare
from fedct.common.cache.pseudonym import load_or_create_salt
from fedct.common.cache.scan_index import verify_cache
from fedct.common.cache.store import (
    CacheError,
    atomic_open,
    patient_content_keys,
    read_manifest,
    read_settings,
    scan_path,
)
from fedct.common.classes import COVID_INDEX, GLOBAL_CLASSES, LabelMapError
from fedct.common.console import out as stdout
from fedct.common.ingest.base import Rejection
from fedct.common.ingest.labels import LabelsError
from fedct.common.metrics.bootstrap import full_report, roc_band
from fedct.common.metrics.calibration import (
    apply_temperature,
    calibration_bins,
    calibration_scores,
    ece_noise_floor,
)
from fedct.common.metrics.classification import roc_curve_points, wilson_interval
from fedct.common.metrics.operating_point import OperatingPoint, choose_operating_point
from fedct.common.model.cam import (
    class_activation_maps,
    evidence_slice,
    inside_share,
    overlay,
)
from fedct.common.model.classifier import SliceClassifier
from fedct.common.model.inference_engine import scoring_model
from fedct.common.provenance import software_versions
from fedct.common.run.directory import CheckpointLoadError, jsonable
from fedct.common.run.load import (
    LoadedModel,
    load_checkpoint,
    operating_point_from_card,
    prepare_settings_from_card,
)
from fedct.common.training.device import DeviceError, pick_device
from fedct.common.training.loop import EvalResult, evaluate

console = Console(stderr=True, soft_wrap=True)  # paths in messages stay whole
PROB_FIELDS = tuple(f"p_{name}" for name in GLOBAL_CLASSES)
PREDICTION_FIELDS = (
    "scan_id",
    "patient_id",
    "split",
    "label",
    *PROB_FIELDS,
    "predicted_class",
    "called_covid19",
    "source",
    "study_uid",
)
OUTPUTS = ("predictions.csv", "metrics.json", "report.html")


@dataclass(frozen=True)
class EvalData:
    """The cache being reported and how it came to be."""

    cache_dir: Path
    kind: str  # "cache" or "raw folder"
    settings: dict[str, Any]
    rejected: dict[str, int]  # raw inputs prepare could not use, by reason
    rejections: tuple[Rejection, ...] = ()
    sources: dict[str, ScanSource] = field(default_factory=dict)  # raw folder: by scan id


def run(args: argparse.Namespace) -> int:
    try:
        return _evaluate(args)
    except (
        CheckpointLoadError,
        CacheError,
        LabelMapError,
        LabelsError,
        DeviceError,
        OSError,
        ValueError,
    ) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        return 2


def _evaluate(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.batch_size < 1 or args.n_boot < 1 or args.cams < 0:
        raise ValueError("--batch-size and --n-boot must be at least 1, --cams at least 0")
    earlier = [name for name in OUTPUTS if (args.out / name).exists()]
    if earlier and not args.force:
        raise ValueError(
            f"{args.out}: holds an earlier evaluation ({', '.join(earlier)}); give --force to "
            "replace it, or another --out"
        )
    loaded = load_checkpoint(args.model, slice_chunk=args.slice_chunk)
    device = pick_device(args.device)
    splits = [s.strip() for s in args.splits.split(",")] if args.splits else None
    tuning = _tuning_set(args.tune_data) if args.tune_data else None
    notes: list[str] = []
    with _cache_for(args, loaded, notes) as data:
        dataset = CacheDataset(data.cache_dir, splits)
        labelled = len(dataset) > 0
        if not labelled:
            dataset = CacheDataset(data.cache_dir, splits, unlabelled=True)
        if len(dataset) == 0:
            raise ValueError(_no_scans(args, data))
        scorer, engine = scoring_model(
            loaded.model, args.engine, device, int(data.settings["size"])
        )
        op, op_source = _operating_point(loaded, scorer, tuning, dataset, args, device, notes)
        result = score_scans(
            scorer, dataset, args.batch_size, device, loaded.temperature, progress=True
        )
        if not labelled:
            args.out.mkdir(parents=True, exist_ok=True)
            for stale in OUTPUTS[1:]:  # an earlier evaluation's metrics are not this data's
                (args.out / stale).unlink(missing_ok=True)
            _write_predictions(args.out / "predictions.csv", dataset.rows, result, op, data)
            _print_unlabelled(result, op, op_source, notes, args.out)
            return 0
        # Patients are resampled in the order of their pixels' digests, not of the salted
        # pseudonyms: a raw folder and its prepared cache give the same intervals.
        keys = patient_content_keys(data.cache_dir, dataset.rows)
        boot_ids = [keys[p] for p in result.patient_ids]
        cams = _cam_figures(loaded, data.cache_dir, result, op, args.cams, notes)
        counts = _data_counts(data, dataset, splits)
    report = {
        "model": {
            "card": loaded.card_path.name,
            "checkpoint": loaded.weights_path.name,
            "sha256": loaded.sha256,
            "round": loaded.round,
            "run": loaded.card.get("run"),
            "software": loaded.card.get("software"),
            "model_config": asdict(loaded.config),
        },
        "software": software_versions(),
        "data": {
            "name": args.data.resolve().name,
            "kind": data.kind,
            "splits": splits or "all",
            **counts,
        },
        "operating_point_source": op_source,
        "loss": result.loss,
        **full_report(
            result.labels, result.probs, boot_ids, op, n_boot=args.n_boot, seed=args.seed
        ),
        "curves": _curves(result, boot_ids, args.n_boot, args.seed, loaded.temperature),
        "calibration": _calibration(result, loaded),
        "by_severity": by_severity(dataset.rows, result, op),
        "decisions_differ": decisions_differ(result, op),
        "notes": notes,
        "device": str(device),
        "engine": engine,
        "seconds": round(time.perf_counter() - started, 2),
    }
    report = jsonable(report)
    args.out.mkdir(parents=True, exist_ok=True)
    _write_predictions(args.out / "predictions.csv", dataset.rows, result, op, data)
    with atomic_open(args.out / "metrics.json") as handle:
        json.dump(report, handle, indent=2, allow_nan=False)
        handle.write("\n")
    with atomic_open(args.out / "report.html") as handle:
        handle.write(render_report(report, cams))
    _print_summary(report, args.out)
    return 0


@contextmanager
def _cache_for(
    args: argparse.Namespace, loaded: LoadedModel, notes: list[str]
) -> Iterator[EvalData]:
    """The cache to report: ``--data`` itself, or a temporary cache prepared from it."""
    settings, missing = prepare_settings_from_card(loaded.card, loaded.card_path)
    if missing:
        notes.append(
            f"the model card's run config lacks {', '.join(RUN_CONFIG_KEYS[m] for m in missing)}; "
            f"PrepareConfig defaults assumed: {_settings_text(settings, missing)}"
        )
    data = Path(args.data)
    if (data / "manifest.csv").is_file():
        if args.labels or args.label_map or args.format != "auto":
            raise ValueError(
                f"{data}: is a prepared cache; --labels, --label-map and --format apply to raw "
                "folders only"
            )
        verify_cache(data, checksum=True)  # the scans scored are the ones the index names
        cached = read_settings(data) or {}
        wanted = {k: v for k, v in settings.items() if k not in missing}
        differ = list(differing_settings(cached, wanted))
        if differ:
            raise CacheError(
                f"{data}: prepared with {_settings_text(cached, differ)}, but the model was "
                f"trained on {_settings_text(settings, differ)}: it would be scored on other "
                "pixels than it learned from. Give the raw folder as --data (evaluate prepares "
                "it with the model's settings) or a cache prepared with them"
            )
        used = {k: cached.get(k, ABSENT_MEANS.get(k)) for k in settings}
        yield EvalData(data, "cache", used, {})
        return
    with prepared_raw(
        data,
        settings,
        fmt=args.format,
        workers=args.workers,
        labels=args.labels,
        label_map=args.label_map,
    ) as (cache_dir, prepared):
        rejected = dict(Counter(r.reason for r in prepared.rejections))
        if rejected:
            notes.append(f"{sum(rejected.values())} raw inputs could not be used: {rejected}")
        sources = scan_sources(data, args.format, load_or_create_salt(cache_dir))
        rows = {row["scan_id"] for row in prepared.rows}
        yield EvalData(
            cache_dir,
            "raw folder",
            settings,
            rejected,
            tuple(prepared.rejections),
            {scan_id: s for scan_id, s in sources.items() if scan_id in rows},
        )


@contextmanager
def prepared_raw(
    data: Path,
    settings: dict[str, Any],
    *,
    fmt: str = "auto",
    workers: int = 1,
    labels: Path | None = None,
    label_map: Path | None = None,
    parent: Path | None = None,
    progress: bool = True,
) -> Iterator[tuple[Path, PrepareResult]]:
    """The raw folder ``data`` prepared with a model's cache ``settings`` into a temporary
    cache (under ``parent``, default the system's temporary folder), removed afterwards."""
    cfg = PrepareConfig(**settings, splits=(0.0, 0.0, 1.0), format=fmt, workers=workers)
    with tempfile.TemporaryDirectory(prefix="fedct-prepared-", dir=parent) as tmp:
        result = prepare(
            data,
            Path(tmp),
            cfg,
            labels=labels,
            label_map=label_map,
            progress=progress,
            qa_report=False,
        )
        yield Path(tmp), result


def score_scans(
    scorer: SliceClassifier,
    dataset: CacheDataset,
    batch_size: int,
    device: torch.device,
    temperature: float,
    *,
    progress: bool = False,
) -> EvalResult:
    """The class probabilities of every scan of ``dataset`` at the card's calibration
    ``temperature``: what evaluate reports and diagnose shows, computed here once for both."""
    return evaluate(
        scorer,
        make_loader(dataset, batch_size),
        device,
        progress=progress,
        temperature=temperature,
    )


def _no_scans(args: argparse.Namespace, data: EvalData) -> str:
    """Why nothing could be scored: the raw inputs' own reasons, else the splits asked for."""
    if data.rejections:
        reasons = "; ".join(
            f"{r.path}: {r.reason}" + (f" ({r.detail})" if r.detail else "")
            for r in data.rejections[:5]
        )
        more = len(data.rejections) - 5
        return f"{args.data}: no usable scan: {reasons}" + (f"; {more} more" if more > 0 else "")
    return f"{args.data}: no scans in split(s) {args.splits or 'any'}"


def _settings_text(settings: dict[str, Any], names: Sequence[str]) -> str:
    return ", ".join(f"{name}={settings.get(name)!r}" for name in names)


def _tuning_set(cache: Path) -> tuple[CacheDataset, str]:
    """The tune split of ``cache``, or all of it when it has none."""
    name = cache.resolve().name
    tune = CacheDataset(cache, ["tune"])
    if len(tune):
        return tune, f"tune split of {name} ({len(tune)} scans)"
    everything = CacheDataset(cache)
    if not len(everything):
        raise ValueError(f"{cache}: no labelled scans to choose the operating point on")
    return everything, f"all of {name} ({len(everything)} scans, it has no tune split)"


def _operating_point(
    loaded: LoadedModel,
    scorer: SliceClassifier,
    tuning: tuple[CacheDataset, str] | None,
    reported: CacheDataset,
    args: argparse.Namespace,
    device: torch.device,
    notes: list[str],
) -> tuple[OperatingPoint, str]:
    """The card's operating point, else one chosen on the tuning set, else a fixed 0.5."""
    stored = operating_point_from_card(loaded.card, loaded.card_path)
    if stored is not None:
        if tuning is not None:
            notes.append("--tune-data was not used: the model card stores an operating point")
        return stored, f"model card {loaded.card_path.name}"
    if tuning is None:
        notes.append(
            f"operating point: {UNTUNED} (the card stores none and no --tune-data was given); "
            "sensitivity, specificity and the other threshold metrics use an arbitrary threshold"
        )
        return OperatingPoint(0.5, "fixed", UNTUNED, math.nan, math.nan), UNTUNED
    dataset, chosen_on = tuning
    shared = {r["scan_id"] for r in dataset.rows} & {r["scan_id"] for r in reported.rows}
    if shared:
        raise ValueError(
            f"{args.tune_data}: {len(shared)} scans of the tuning data are also being reported; "
            "choose the operating point on other data (e.g. --splits test with the same cache)"
        )
    # The threshold is chosen on the probabilities it is applied to: calibrated ones.
    tuned = evaluate(
        scorer,
        make_loader(dataset, args.batch_size),
        device,
        progress=True,
        temperature=loaded.temperature,
    )
    op = choose_operating_point(
        tuned.labels,
        tuned.probs,
        args.rule,
        min_specificity=args.min_specificity,
        chosen_on=chosen_on,
    )
    return op, "--tune-data"


def _data_counts(data: EvalData, dataset: CacheDataset, splits: list[str] | None) -> dict[str, Any]:
    in_splits = [r for r in read_manifest(data.cache_dir) if splits is None or r["split"] in splits]
    per_class = Counter(r["global_class"] for r in dataset.rows)
    return {
        "scans_per_class": {name: per_class.get(name, 0) for name in GLOBAL_CLASSES},
        "unlabelled_scans_skipped": sum(int(r["class_index"]) < 0 for r in in_splits),
        "rejected_inputs": data.rejected,
        "cache_settings": data.settings,
    }


def _calibration(result: EvalResult, loaded: LoadedModel) -> dict[str, Any]:
    """ECE and Brier score of the reported (calibrated) probabilities, the temperature and
    where it came from, and the same scores before the temperature when there is one."""
    scores: dict[str, Any] = {
        **calibration_scores(result.labels, result.probs),
        "ece_noise_floor": ece_noise_floor(result.probs),
        "temperature": loaded.temperature,
        "temperature_source": (
            f"model card {loaded.card_path.name}, chosen on {loaded.calibration.chosen_on}"
            if loaded.calibration is not None
            else "none: the model card stores no calibration"
        ),
    }
    if loaded.temperature != 1.0:
        raw = apply_temperature(result.probs, 1.0 / loaded.temperature)
        scores["before"] = calibration_scores(result.labels, raw)
    return scores


def _curves(
    result: EvalResult, boot_ids: list[str], n_boot: int, seed: int, temperature: float
) -> dict[str, Any]:
    """The ROC curve with its bootstrap band (absent without both classes) and the
    reliability bins, also before the ``temperature`` when it is not 1; ``boot_ids`` name
    each scan's patient for the bootstrap."""
    positive = result.labels == COVID_INDEX
    roc = None
    if positive.any() and not positive.all():
        fpr, tpr, thresholds = roc_curve_points(result.labels, result.probs)
        band = roc_band(result.labels, result.probs, boot_ids, n_boot=n_boot, seed=seed)
        roc = {"fpr": fpr, "tpr": tpr, "thresholds": thresholds, "band": band}
    curves = {"roc": roc, "calibration": calibration_bins(result.labels, result.probs)}
    if temperature != 1.0:
        raw = apply_temperature(result.probs, 1.0 / temperature)
        curves["calibration_before"] = calibration_bins(result.labels, raw)
    return curves


def _write_predictions(
    path: Path, rows: list[dict[str, str]], result: EvalResult, op: OperatingPoint, data: EvalData
) -> None:
    split_of = {r["scan_id"]: r["split"] for r in rows}
    unknown = ScanSource("", "")
    called = op.predict_covid(result.probs)
    with atomic_open(path) as handle:
        writer = csv.writer(handle)
        writer.writerow(PREDICTION_FIELDS)
        for i, scan_id in enumerate(result.scan_ids):
            writer.writerow(
                [
                    scan_id,
                    result.patient_ids[i],
                    split_of[scan_id],
                    GLOBAL_CLASSES[result.labels[i]] if result.labels[i] >= 0 else "",
                    *(f"{p:.6f}" for p in result.probs[i]),
                    GLOBAL_CLASSES[int(result.probs[i].argmax())],
                    int(called[i]),
                    *data.sources.get(scan_id, unknown),
                ]
            )


def _cam_figures(
    loaded: LoadedModel,
    cache_dir: Path,
    result: EvalResult,
    op: OperatingPoint,
    count: int,
    notes: list[str],
) -> dict[str, list[str]]:
    """COVID-19 evidence maps of the ``count`` most confidently correct and wrong scans (by
    the decision at the operating point), each on the slice with the most evidence: the plain
    slice, and the slice with its evidence on the fixed scale and its lungs outlined."""
    score = result.probs[:, COVID_INDEX]
    called = op.predict_covid(result.probs)
    correct = called == (result.labels == COVID_INDEX)
    order = np.argsort(-np.abs(score - op.threshold), kind="stable")
    chosen = {
        "correct": [i for i in order if correct[i]][:count],
        "wrong": [i for i in order if not correct[i]][:count],
    }
    figures: dict[str, list[str]] = {"correct": [], "wrong": []}
    for kind, indices in chosen.items():
        for i in indices:
            scan_id = result.scan_ids[i]
            pixels = np.load(scan_path(cache_dir, scan_id))
            try:
                maps = class_activation_maps(
                    loaded.model,
                    to_model_input(pixels),
                    COVID_INDEX,
                    temperature=loaded.temperature,
                )
            except ValueError as exc:  # a backbone without spatial feature maps
                notes.append(f"no evidence maps: {exc}")
                return {"correct": [], "wrong": []}
            best = evidence_slice(maps)
            lungs = read_lung_mask(cache_dir, scan_id, pixels.shape)
            where = (
                "no lung mask in this cache"
                if lungs is None
                else f"{inside_share(maps, lungs):.0%} of the scan's evidence inside the lungs"
            )
            caption = (
                f"{scan_id}: {GLOBAL_CLASSES[result.labels[i]]}, p(COVID-19) {score[i]:.3f}, "
                f"called {'COVID-19' if called[i] else 'not COVID-19'}; "
                f"slice {best + 1} of {len(maps)} (selected slices), plain and with its "
                f"evidence (peak {maps[best].max():.3g}); {where}"
            )
            border = None if lungs is None else outline(lungs[best])
            plain = html_page.png_img(pixels[best], f"slice of scan {scan_id}")
            image = html_page.png_img(
                overlay(pixels[best], maps[best], outline=border), f"CAM of scan {scan_id}"
            )
            figures[kind].append(html_page.figure(plain + image, caption))
    return figures


def by_severity(
    rows: list[dict[str, str]], result: EvalResult, op: OperatingPoint
) -> list[dict[str, Any]]:
    """Per MosMedData severity (the manifest's ``severity``, CT-0 to CT-4): scans, those called
    COVID-19 at the operating point, and that share with its Wilson 95 % CI: the sensitivity
    for CT-1..CT-4, one minus the specificity for CT-0.  Empty when no scan has a severity."""
    severity_of = {row["scan_id"]: row.get("severity", "") for row in rows}
    called = op.predict_covid(result.probs)
    groups: dict[str, list[bool]] = {}
    for scan_id, is_called in zip(result.scan_ids, called, strict=True):
        if severity_of.get(scan_id):
            groups.setdefault(severity_of[scan_id], []).append(bool(is_called))
    out = []
    for severity in sorted(groups):
        calls = groups[severity]
        low, high = wilson_interval(sum(calls), len(calls))
        out.append(
            {
                "severity": severity,
                "scans": len(calls),
                "called_covid19": sum(calls),
                "share_called": sum(calls) / len(calls),
                "ci": [low, high],
            }
        )
    return out


def decisions_differ(result: EvalResult, op: OperatingPoint) -> int:
    """Scans whose argmax class is COVID-19 but which the threshold does not call COVID-19,
    or the other way round: why the 3 × 3 and the 2 × 2 confusion matrices disagree."""
    argmax_covid = result.probs.argmax(axis=1) == COVID_INDEX
    return int(np.sum(argmax_covid != op.predict_covid(result.probs)))


def _print_unlabelled(
    result: EvalResult, op: OperatingPoint, op_source: str, notes: list[str], out: Path
) -> None:
    for note in notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    called = int(op.predict_covid(result.probs).sum())
    stdout.print(
        f"{len(result.scan_ids)} unlabelled scans scored, {called} called COVID-19 at threshold "
        f"{op.threshold:.4g} ({op_source}); no metrics without labels",
        highlight=False,
    )
    stdout.print(
        f"wrote predictions.csv to {out}; `fedct diagnose` gives each study a page with its "
        "evidence",
        highlight=False,
    )


def _print_summary(report: dict[str, Any], out: Path) -> None:
    for note in report["notes"]:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    metrics = report["metrics"]
    stdout.print(
        f"{report['n_scans']} scans of {report['n_patients']} patients: "
        f"AUC {ci_text(metrics['auc_covid'])}, sensitivity {ci_text(metrics['sens_covid'])}, "
        f"specificity {ci_text(metrics['spec_covid'])} at threshold "
        f"{report['operating_point']['threshold']:.4g} ({report['operating_point_source']})"
    )
    stdout.print(f"wrote predictions.csv, metrics.json and report.html to {out}", highlight=False)
