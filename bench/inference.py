"""CPU scoring speed of ``fedct evaluate``: eager PyTorch against compiled CPU paths.

Two models: (a) the demo's trained Lite0 (128², a demo run's best round) on the demo's external
set, so that the external AUC of every path can be compared; (b) B3 at 512², randomly
initialised, on random scans of ``--slices`` slices (scores compared only).  Every candidate
scores the same batches through ``fedct.common.training.loop.evaluate``, as ``fedct evaluate`` does,
interleaved batch by batch so that the machine's load falls on all of them alike; a candidate's
speed-up is eager's seconds over its own, summed over the batches of one pass, the median over
``--repeats`` passes.  Scores are compared scan by scan with eager's (max |Δp|, ΔAUC).

Candidates: eager with channels-first tensors, the engines of common/model/inference_engine.py
(OpenVINO, ONNX Runtime), ``torch.compile`` (inductor), and int8 models quantised statically
by ONNX Runtime (QDQ, calibrated on slices that are not scored: the demo's hospital-a tune
split, random slices for B3) run by ONNX Runtime and by OpenVINO.

    python -m bench.inference [--runs demo/runs] [--external demo/cache/mosmed] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from bench.fl_overhead import AUC_TARGET
from bench.harness import RESULTS, fmt, machine
from fedct.common.cache.dataset import Batch, CacheDataset, make_loader
from fedct.common.cache.store import CacheError
from fedct.common.metrics.classification import summarize
from fedct.common.model import RUNTIMES
from fedct.common.model.classifier import ModelConfig, SliceClassifier, build_model
from fedct.common.model.inference_engine import (
    RuntimeBackbone,
    compile_backbone,
    export_onnx,
    load_runner,
    with_backbone,
)
from fedct.common.run.directory import CheckpointLoadError
from fedct.common.run.load import load_checkpoint
from fedct.common.training.loop import evaluate

SPEED_TARGET = 2.0
CALIBRATION_SLICES = 32
Candidate = Callable[[SliceClassifier, int, Path], SliceClassifier]


def channels_first(model: SliceClassifier, size: int, work: Path) -> SliceClassifier:
    clone = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    clone.cfg = dataclasses.replace(model.cfg, channels_last=False)
    return clone


def runtime_candidate(runtime: str) -> Candidate:
    def make(model: SliceClassifier, size: int, work: Path) -> SliceClassifier:
        runner = compile_backbone(model, runtime, size, cache_dir=work)
        return with_backbone(model, RuntimeBackbone(runner, runtime))

    return make


def compiled(model: SliceClassifier, size: int, work: Path) -> SliceClassifier:
    return with_backbone(model, torch.compile(model.backbone, dynamic=True))


def int8_candidate(runtime: str, calibration: np.ndarray) -> Candidate:
    def make(model: SliceClassifier, size: int, work: Path) -> SliceClassifier:
        path = quantised_onnx(model, size, work, calibration)
        return with_backbone(model, RuntimeBackbone(load_runner(path, runtime), runtime))

    return make


def quantised_onnx(model: SliceClassifier, size: int, work: Path, calibration: np.ndarray) -> Path:
    """The backbone quantised to int8 (QDQ, per-channel weights), calibrated on ``calibration``
    backbone inputs; made once per pass and reused."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    target = work / f"int8-{model.cfg.backbone}-{size}.onnx"
    if target.exists():
        return target

    class Slices(CalibrationDataReader):
        def __init__(self) -> None:
            self.chunks = iter(np.array_split(calibration, max(1, len(calibration) // 8)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            chunk = next(self.chunks, None)
            return None if chunk is None else {"x": np.ascontiguousarray(chunk)}

    fp32 = work / f"fp32-{model.cfg.backbone}-{size}.onnx"
    prepared = work / f"pre-{model.cfg.backbone}-{size}.onnx"
    export_onnx(model.backbone.eval(), size, fp32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant_pre_process(str(fp32), str(prepared))
        quantize_static(
            str(prepared),
            str(target),
            Slices(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )
    return target


def backbone_inputs(model: SliceClassifier, slices: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model.backbone_input(slices).contiguous().numpy()


def demo_checkpoint(runs: Path) -> Path:
    """The best round of the newest demo run under ``runs`` that has one."""
    bests = sorted(runs.glob("*/best.json"), key=lambda p: p.stat().st_mtime)
    if not bests:
        raise ValueError(f"{runs}: no run with a best.json; run `fedct demo` first")
    best = json.loads(bests[-1].read_text())
    return bests[-1].parent / best["checkpoint"]


def demo_batches(external: Path) -> list[Batch]:
    return list(make_loader(CacheDataset(external), batch_size=2))


def demo_calibration(model: SliceClassifier, site: Path) -> np.ndarray:
    """Backbone inputs from a hospital's tune split: never the external scans being scored."""
    slices = [item.pixels for item in CacheDataset(site, ["tune"])]
    picked = torch.cat(slices)[:: max(1, sum(len(s) for s in slices) // CALIBRATION_SLICES)]
    return backbone_inputs(model, picked[:CALIBRATION_SLICES])


def random_batches(scans: int, slices: int, size: int, seed: int = 0) -> list[Batch]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, scans, 2):
        n = min(2, scans - start)
        x = torch.rand(n, slices, 1, size, size, generator=generator)
        mask = torch.ones(n, slices, dtype=torch.bool)
        ids = [f"random-{start + i}" for i in range(n)]
        out.append(
            Batch(x, mask, torch.tensor([2 * ((start + i) % 2) for i in range(n)]), ids, ids)
        )
    return out


def score_side_by_side(
    models: dict[str, SliceClassifier], batches: list[Batch], repeats: int, console: Console
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, np.ndarray], np.ndarray]:
    """Per-pass seconds of every model over ``batches`` (interleaved batch by batch), its
    seconds per batch of the first pass, the probabilities of that pass, and the labels."""
    seconds: dict[str, list[float]] = {name: [] for name in models}
    per_batch: dict[str, list[float]] = {name: [] for name in models}
    probs: dict[str, np.ndarray] = {}
    labels = np.concatenate([b.y.numpy() for b in batches])
    for repeat in range(repeats):
        spent = dict.fromkeys(models, 0.0)
        collected: dict[str, list[np.ndarray]] = {name: [] for name in models}
        for i, batch in enumerate(batches):
            order = list(models) if (repeat + i) % 2 == 0 else list(reversed(models))
            for name in order:
                start = time.perf_counter()
                result = evaluate(models[name], [batch], "cpu")
                elapsed = time.perf_counter() - start
                spent[name] += elapsed
                if repeat == 0:
                    per_batch[name].append(elapsed)
                collected[name].append(result.probs)
            console.print(f"  pass {repeat + 1}/{repeats}: batch {i + 1}/{len(batches)}", end="\r")
        for name in models:
            seconds[name].append(spent[name])
            probs.setdefault(name, np.concatenate(collected[name]))
    console.print()
    return seconds, per_batch, probs, labels


def benchmark(
    label: str,
    model: SliceClassifier,
    candidates: dict[str, Candidate],
    batches: list[Batch],
    size: int,
    repeats: int,
    work: Path,
    console: Console,
) -> dict[str, Any]:
    """Every candidate built (or its failure recorded) and scored beside eager."""
    console.print(f"[bold]{label}[/bold]: building {len(candidates)} candidates")
    models = {"eager": model}
    build: dict[str, Any] = {}
    for name, make in candidates.items():
        start = time.perf_counter()
        try:
            candidate = make(model, size, work)
            evaluate(candidate, batches[:1], "cpu")  # compiles lazily compiled paths
            models[name] = candidate
            build[name] = {"build_seconds": round(time.perf_counter() - start, 2)}
        except Exception as exc:  # a candidate that cannot be built is a finding
            build[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        console.print(f"  {name}: {build[name]}")
    evaluate(model, batches[:1], "cpu")
    seconds, per_batch, probs, labels = score_side_by_side(models, batches, repeats, console)
    scans = len(labels)
    rows = {}
    eager_auc = summarize(labels, probs["eager"])["auc_covid"]
    for name in ["eager", *candidates]:
        if name not in models:
            rows[name] = build[name]
            continue
        ratios = [e / s for e, s in zip(seconds["eager"], seconds[name], strict=True)]
        auc = summarize(labels, probs[name])["auc_covid"]
        rows[name] = {
            **build.get(name, {}),
            "seconds_per_pass": [round(s, 3) for s in seconds[name]],
            "scans_per_second": scans / statistics.median(seconds[name]),
            "speedup_vs_eager": statistics.median(ratios),
            "median_batch_speedup": statistics.median(
                e / s for e, s in zip(per_batch["eager"], per_batch[name], strict=True)
            ),
            "max_abs_dp": float(np.abs(probs[name] - probs["eager"]).max()),
            "external_auc": auc,
            "delta_auc": auc - eager_auc,
        }
    return {"scans": scans, "slices": int(sum(int(b.mask.sum()) for b in batches)), **rows}


def winner(rows: dict[str, Any]) -> str | None:
    """The fastest candidate whose scores stay within the AUC target of eager's."""
    fair = {
        name: row["speedup_vs_eager"]
        for name, row in rows.items()
        if isinstance(row, dict)
        and "speedup_vs_eager" in row
        and name != "eager"
        and (np.isnan(row["delta_auc"]) or abs(row["delta_auc"]) <= AUC_TARGET)
    }
    return max(fair, key=fair.get) if fair else None


def table(title: str, rows: dict[str, Any]) -> Table:
    out = Table(title=title)
    for column in ("path", "scans/s", "× eager", "max |Δp|", "external AUC", "ΔAUC", "build s"):
        out.add_column(column, justify="left" if column == "path" else "right")
    for name, row in rows.items():
        if not isinstance(row, dict):
            continue
        if "error" in row:
            out.add_row(name, "failed", row["error"][:60], "", "", "", "")
            continue
        out.add_row(
            name,
            fmt(row["scans_per_second"], ".2f"),
            fmt(row["speedup_vs_eager"], ".2f"),
            fmt(row["max_abs_dp"], ".2g"),
            fmt(row["external_auc"], ".4f"),
            fmt(row["delta_auc"], "+.4f"),
            fmt(row.get("build_seconds"), ".1f"),
        )
    return out


def candidates_for(calibration: np.ndarray, skip: set[str]) -> dict[str, Candidate]:
    every: dict[str, Candidate] = {
        "eager channels-first": channels_first,
        **{runtime: runtime_candidate(runtime) for runtime in RUNTIMES},
        "torch.compile": compiled,
        "int8 onnxruntime": int8_candidate("onnxruntime", calibration),
        "int8 openvino": int8_candidate("openvino", calibration),
    }
    return {name: make for name, make in every.items() if name not in skip}


def set_threads(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


@dataclasses.dataclass
class Suite:
    key: str
    label: str
    model: SliceClassifier
    batches: list[Batch]
    size: int
    calibration: np.ndarray


def suites(args: argparse.Namespace) -> Iterator[Suite]:
    if args.suite in ("all", "demo"):
        yield demo_suite(args)
    if args.b3_scans and args.suite in ("all", "b3"):
        torch.manual_seed(0)
        b3 = build_model(ModelConfig(backbone="efficientnet_b3")).eval()
        calibration = torch.rand(CALIBRATION_SLICES // 4, 1, args.size, args.size)
        yield Suite(
            "b3",
            f"efficientnet_b3 {args.size}², random init, {args.b3_scans} × {args.slices} slices",
            b3,
            random_batches(args.b3_scans, args.slices, args.size),
            args.size,
            backbone_inputs(b3, calibration),
        )


def demo_suite(args: argparse.Namespace) -> Suite:
    checkpoint = demo_checkpoint(args.runs)
    loaded = load_checkpoint(checkpoint)
    batches = demo_batches(args.external)
    size = int(batches[0].x.shape[-1])
    return Suite(
        "demo",
        f"demo {loaded.config.backbone} {size}² ({checkpoint.parent.name}/{checkpoint.name})",
        loaded.model,
        batches,
        size,
        demo_calibration(loaded.model, args.calibration_site),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("demo/runs"))
    parser.add_argument("--external", type=Path, default=Path("demo/cache/mosmed"))
    parser.add_argument("--calibration-site", type=Path, default=Path("demo/cache/hospital-a"))
    parser.add_argument("--b3-scans", type=int, default=20, help="0 skips B3")
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="passes of the demo set")
    parser.add_argument("--b3-repeats", type=int, default=1, help="passes of the B3 scans")
    parser.add_argument("--threads", type=int, default=2, help="OMP/torch/runtime threads")
    parser.add_argument("--skip", action="append", default=[], help="a candidate to leave out")
    parser.add_argument("--b3-skip", action="append", default=[], help="… of B3 only")
    parser.add_argument(
        "--suite",
        choices=("all", "demo", "b3"),
        default="all",
        help="one suite only: its entry in --out is replaced, the other's kept",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "inference.json")
    args = parser.parse_args()
    set_threads(args.threads)
    console = Console()
    result: dict[str, Any] = {
        "machine": machine(),
        "threads": args.threads,
        "targets": {"speedup": SPEED_TARGET, "abs_delta_auc": AUC_TARGET},
        "suites": {},
    }
    try:
        with tempfile.TemporaryDirectory(prefix="fedct-bench-inference-") as tmp:
            for suite in suites(args):
                b3 = suite.key == "b3"
                repeats = args.b3_repeats if b3 else args.repeats
                skip = set(args.skip) | (set(args.b3_skip) if b3 else set())
                work = Path(tmp) / suite.key
                work.mkdir()
                rows = benchmark(
                    suite.label,
                    suite.model,
                    candidates_for(suite.calibration, skip),
                    suite.batches,
                    suite.size,
                    repeats,
                    work,
                    console,
                )
                rows["label"] = suite.label
                rows["repeats"] = repeats
                rows["skipped"] = sorted(skip)
                rows["winner"] = winner(rows)
                result["suites"][suite.key] = rows
                console.print(table(suite.label, rows))
                # Written after each suite, a slow second suite leaves the first on disk; one
                # suite alone keeps the other's entry, read as late as possible.
                kept = earlier_suites(args.out) if args.suite != "all" else {}
                write_json(args.out, {**result, "suites": {**kept, **result["suites"]}})
    except (CheckpointLoadError, CacheError, ValueError, KeyError, OSError) as exc:
        sys.exit(f"error: {exc}")
    console.print(f"wrote {args.out}")
    console.print(summary_line(result))


def earlier_suites(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())["suites"]
    except (OSError, ValueError, KeyError):
        return {}


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")


def summary_line(result: dict[str, Any]) -> str:
    parts = []
    for rows in result["suites"].values():
        label = rows["label"]
        best = rows["winner"]
        if best is None:
            parts.append(f"{label.split(' (')[0]}: no candidate within ΔAUC {AUC_TARGET}")
            continue
        row = rows[best]
        parts.append(
            f"{label.split(',')[0].split(' (')[0]}: {best} {row['speedup_vs_eager']:.2f}× eager "
            f"({row['scans_per_second']:.2f} vs {rows['eager']['scans_per_second']:.2f} scans/s), "
            f"max |Δp| {row['max_abs_dp']:.1g}, ΔAUC {row['delta_auc']:+.4f}"
        )
    return f"{result['threads']} threads — " + "; ".join(parts)


if __name__ == "__main__":
    main()
