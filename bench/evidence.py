"""Where the evidence maps put their evidence: the share of positive evidence inside the lung
mask, on the external set's true positives, for every method of common/model/cam.py.

A scan's share is the positive evidence (summed over its selected slices) that lies inside
its lung mask (common/cache/lung_mask.py, stored by ``fedct prepare``) over all of its positive
evidence; the figure of a method is the mean over the true positives (COVID-19 scans called
COVID-19 at the model card's operating point, else at 0.5), with the median, the share of
scans at or above the target (0.8) and the pooled share.  The lungs' share of the slices is
what a map spread evenly over the slice would score.

    python -m bench.evidence --model RUN/round_NNN.safetensors --external CACHE \
        [--methods cam,gradxact-16] [--out bench/results/evidence.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.harness import RESULTS, machine
from fedct.common.cache.dataset import CacheDataset, make_loader, to_model_input
from fedct.common.cache.lung_mask import read_lung_mask
from fedct.common.cache.store import CacheError, scan_path
from fedct.common.classes import COVID_INDEX
from fedct.common.model.cam import METHODS, class_activation_maps, inside_share
from fedct.common.run.directory import CheckpointLoadError
from fedct.common.run.load import load_checkpoint, operating_point_from_card
from fedct.common.training.loop import evaluate

TARGET = 0.8
console = Console(stderr=True)


def measure(model_path: Path, external: Path, methods: list[str], limit: int) -> dict[str, Any]:
    loaded = load_checkpoint(model_path)
    data = CacheDataset(external)
    result = evaluate(loaded.model, make_loader(data, 8), "cpu", progress=True)
    op = operating_point_from_card(loaded.card, loaded.card_path)
    threshold = op.threshold if op is not None else 0.5
    called = result.probs[:, COVID_INDEX] >= threshold
    positives = [
        i for i in range(len(result.scan_ids)) if called[i] and result.labels[i] == COVID_INDEX
    ]
    positives = positives[:limit] if limit else positives
    shares: dict[str, list[float]] = {m: [] for m in methods}
    pooled = {m: [0.0, 0.0] for m in methods}
    seconds = dict.fromkeys(methods, 0.0)
    lung_area, missing = [], 0
    for n, i in enumerate(positives, 1):
        scan_id = result.scan_ids[i]
        pixels = np.load(scan_path(external, scan_id))
        mask = read_lung_mask(external, scan_id, pixels.shape)
        if mask is None:
            missing += 1
            continue
        lung_area.append(float(mask.mean()))
        x = to_model_input(pixels)
        for method in methods:
            began = time.perf_counter()
            maps = class_activation_maps(loaded.model, x, COVID_INDEX, method=method)
            seconds[method] += time.perf_counter() - began
            shares[method].append(inside_share(maps, mask))
            pooled[method][0] += float((maps * mask).sum())
            pooled[method][1] += float(maps.sum())
        console.print(f"{n}/{len(positives)} true positives", end="\r")
    scored = len(lung_area)
    return {
        "model": {"card": str(loaded.card_path), "sha256": loaded.sha256},
        "external": str(external),
        "threshold": threshold,
        "true_positives": len(positives),
        "without_mask": missing,
        "lungs_share_of_slices": statistics.fmean(lung_area) if lung_area else None,
        "target": TARGET,
        "methods": {
            method: _summary(shares[method], pooled[method], seconds[method], scored)
            for method in methods
        },
    }


def _summary(
    shares: list[float], pooled: list[float], seconds: float, scored: int
) -> dict[str, Any]:
    valid = [s for s in shares if s == s]
    return {
        "mean_share_inside": statistics.fmean(valid) if valid else None,
        "median_share_inside": statistics.median(valid) if valid else None,
        "scans_at_target": sum(s >= TARGET for s in valid),
        "scans": len(valid),
        "scans_without_evidence": len(shares) - len(valid),
        "pooled_share_inside": pooled[0] / pooled[1] if pooled[1] else None,
        "seconds_per_scan": seconds / scored if scored else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a checkpoint or model card")
    parser.add_argument("--external", type=Path, required=True, help="a cache with lung masks")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--limit", type=int, default=0, help="at most this many scans (0: all)")
    parser.add_argument("--out", type=Path, default=RESULTS / "evidence.json")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := sorted(set(methods) - set(METHODS)):
        sys.exit(f"error: unknown methods {unknown}; expected some of {', '.join(METHODS)}")
    try:
        figures = measure(args.model, args.external, methods, args.limit)
    except (CheckpointLoadError, CacheError, OSError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    result = {"machine": machine(), **figures}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title=f"evidence inside the lungs, {figures['true_positives']} true positives")
    for column in ("method", "mean", "median", f"≥ {TARGET}", "pooled", "s/scan"):
        table.add_column(column, justify="right" if column != "method" else "left")
    for method, row in figures["methods"].items():
        table.add_row(
            method,
            *(
                "–" if row[key] is None else f"{row[key]:.3f}"
                for key in ("mean_share_inside", "median_share_inside")
            ),
            f"{row['scans_at_target']}/{row['scans']}",
            "–" if row["pooled_share_inside"] is None else f"{row['pooled_share_inside']:.3f}",
            "–" if row["seconds_per_scan"] is None else f"{row['seconds_per_scan']:.2f}",
        )
    Console().print(table)
    lungs = figures["lungs_share_of_slices"]
    print(
        f"the lungs cover {lungs:.3f} of the slices (an even map's share); wrote {args.out}"
        if lungs is not None
        else f"no true positive had a lung mask; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
