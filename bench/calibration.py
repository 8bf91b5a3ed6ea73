"""Calibration of a federated model, its temperature fitted the federated way, offline.

Each site's tune split is scored and turned into :func:`tune_nll_grid` (the function a site
calls: its tune NLL summed at every temperature of the grid, an aggregate); the coordinator's
:func:`choose_temperature` sums the sites' grids and takes the minimum.  No scan is pooled to
choose it.  Then, before (T = 1) and after:

* the expected calibration error (ECE, 10 bins of p(COVID-19)), Brier score, NLL and AUC on
  the sites' test splits pooled (the target: ECE ≤ 0.05) and on the external set;
* the federated operating point, chosen on the sites' summed tune histograms of p(COVID-19)
  as the coordinator chooses it — on the probabilities of that temperature, since the
  threshold moves with it — and the external sensitivity and specificity there;
* the ECE that perfectly calibrated probabilities would show on the same scans (labels drawn
  from p(COVID-19) itself): on a few dozen test scans it is far above 0.05, so
  ``--held-out`` adds caches of more patients of the same sites (e.g. ``fedct synth`` with
  another seed, prepared with ``--splits 0,0,1``), scored as one more pooled test set;
* a per-class variant for comparison: a temperature and a COVID-19 logit offset chosen the
  same way on a two-dimensional grid (21 offsets from -2 to 2), and the temperature that
  would be best on each reported set itself (what no deployment can choose): how much of
  the error a temperature could remove at all.

    python -m bench.calibration --model RUN/round_NNN.safetensors --sites CACHE,CACHE,... \
        --external CACHE [--held-out CACHE,...] [--out bench/results/calibration.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.harness import RESULTS, machine
from fedct.common.cache.dataset import CacheDataset, make_loader
from fedct.common.cache.store import CacheError
from fedct.common.classes import COVID_INDEX
from fedct.common.metrics.calibration import (
    apply_temperature,
    calibration_scores,
    choose_temperature,
    ece_noise_floor,
    temperature_grid,
    tune_nll_grid,
)
from fedct.common.metrics.classification import summarize
from fedct.common.metrics.pooled_operating_point import choose_from_histograms, score_histograms
from fedct.common.run.directory import CheckpointLoadError
from fedct.common.run.load import load_checkpoint
from fedct.common.training.loop import evaluate

TARGET_ECE = 0.05


def _score(model: Any, cache: Path, splits: list[str] | None) -> tuple[np.ndarray, np.ndarray]:
    data = CacheDataset(cache, splits)
    if not len(data):
        return np.zeros(0, np.int64), np.zeros((0, 3))
    result = evaluate(model, make_loader(data, 8), "cpu")
    return result.labels, result.probs


def _figures(labels: np.ndarray, probs: np.ndarray, threshold: float | None) -> dict[str, Any]:
    nll = float(-np.mean(np.log(np.clip(probs[np.arange(labels.size), labels], 1e-300, 1))))
    figures = {**calibration_scores(labels, probs), "nll": nll}
    figures["ece_noise_floor"] = ece_noise_floor(probs)
    figures["auc"] = summarize(labels, probs)["auc_covid"]
    if threshold is not None:
        at = summarize(labels, probs, threshold=threshold)
        figures.update(threshold=threshold, sens=at["sens_covid"], spec=at["spec_covid"])
    return figures


DEFAULT_BINS = 50  # the run config's operating-point-bins default


def _operating_threshold(
    tune: list[tuple[np.ndarray, np.ndarray]], temperature: float, bins: int
) -> float:
    """The federated operating point on the sites' summed tune histograms of ``bins`` bins
    at ``temperature``."""
    histograms = [
        score_histograms(labels, apply_temperature(probs, temperature), bins)
        for labels, probs in tune
    ]
    covid = np.sum([h[0] for h in histograms], axis=0)
    other = np.sum([h[1] for h in histograms], axis=0)
    return choose_from_histograms(covid, other).threshold


def _best_temperature(labels: np.ndarray, probs: np.ndarray, grid: np.ndarray) -> float:
    return choose_temperature([tune_nll_grid(labels, probs, grid)], grid).temperature


OFFSETS = np.linspace(-2.0, 2.0, 21)


def _with_offset(probs: np.ndarray, temperature: float, offset: float) -> np.ndarray:
    """The per-class variant: logits / T, then ``offset`` added to the COVID-19 logit."""
    scaled = np.log(np.clip(apply_temperature(probs, temperature), 1e-300, 1.0))
    scaled[:, COVID_INDEX] += offset
    out = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    return out / out.sum(axis=1, keepdims=True)


def _per_class_choice(
    tune: list[tuple[np.ndarray, np.ndarray]], grid: np.ndarray
) -> tuple[float, float]:
    """(T, offset) of the smallest summed tune NLL over the grid × OFFSETS, as sites would
    send it: one NLL sum per (T, offset) and site.  The offset is applied after the
    temperature, so each site's sums are computed per (T, offset) pair."""
    sums = np.zeros((grid.size, OFFSETS.size))
    for labels, probs in tune:
        if not labels.size:
            continue
        for i, temperature in enumerate(grid):
            for j, offset in enumerate(OFFSETS):
                shifted = _with_offset(probs, temperature, offset)
                sums[i, j] -= np.log(
                    np.clip(shifted[np.arange(labels.size), labels], 1e-300, 1)
                ).sum()
    i, j = np.unravel_index(int(np.argmin(sums)), sums.shape)
    return float(grid[i]), float(OFFSETS[j])


def measure(
    model_path: Path, sites: list[Path], external: Path, held_out: list[Path], bins: int | None
) -> dict[str, Any]:
    loaded = load_checkpoint(model_path)
    if bins is None:
        run_config = loaded.card.get("run_config") or {}
        bins = int(run_config.get("operating-point-bins", DEFAULT_BINS))
    console = Console(stderr=True)
    grid = temperature_grid()
    tune, test = [], []
    for cache in sites:
        console.print(f"scoring {cache.name}: tune and test splits")
        tune.append(_score(loaded.model, cache, ["tune"]))
        test.append(_score(loaded.model, cache, ["test"]))
    console.print(f"scoring {external.name}")
    ext_labels, ext_probs = _score(loaded.model, external, None)
    extra = [_score(loaded.model, cache, None) for cache in held_out]
    # What each site would send, and the coordinator's choice.
    grids = [tune_nll_grid(labels, probs, grid) for labels, probs in tune]
    scans = sum(len(labels) for labels, _ in tune)
    chosen = choose_temperature(
        grids, grid, chosen_on=f"tune splits of {len(sites)} sites, {scans} scans"
    )
    test_labels = np.concatenate([labels for labels, _ in test])
    test_probs = np.concatenate([probs for _, probs in test])
    sets = {"pooled_test": (test_labels, test_probs), "external": (ext_labels, ext_probs)}
    if extra:
        sets["held_out"] = (
            np.concatenate([labels for labels, _ in extra]),
            np.concatenate([probs for _, probs in extra]),
        )
    out: dict[str, Any] = {
        "model": {"card": str(loaded.card_path), "sha256": loaded.sha256},
        "sites": [str(s) for s in sites],
        "external": str(external),
        "held_out": [str(c) for c in held_out],
        "held_out_scans": int(sets["held_out"][0].size) if extra else 0,
        "calibration": chosen.to_dict() | {"grid": [grid[0], grid[-1], len(grid)]},
        "target_ece": TARGET_ECE,
        "operating_point_bins": bins,
        "pooled_test_scans": int(test_labels.size),
        "external_scans": int(ext_labels.size),
    }
    for name, temperature in (("before", 1.0), ("after", chosen.temperature)):
        threshold = _operating_threshold(tune, temperature, bins)
        out[name] = {"temperature": temperature}
        for set_name, (labels, probs) in sets.items():
            at = threshold if set_name == "external" else None
            out[name][set_name] = _figures(labels, apply_temperature(probs, temperature), at)
    temperature, offset = _per_class_choice(tune, grid)
    out["per_class_variant"] = {"temperature": temperature, "covid_offset": offset}
    for set_name, (labels, probs) in sets.items():
        out["per_class_variant"][set_name] = _figures(
            labels, _with_offset(probs, temperature, offset), None
        )
    for name, (labels, probs) in sets.items():
        best = _best_temperature(labels, probs, grid)
        out.setdefault("oracle", {})[name] = {
            "temperature": best,
            **_figures(labels, apply_temperature(probs, best), None),
        }
    covid = ext_labels == COVID_INDEX
    out["external_mean_p_covid"] = {
        "covid19": float(ext_probs[covid, COVID_INDEX].mean()) if covid.any() else None,
        "other": float(ext_probs[~covid, COVID_INDEX].mean()) if (~covid).any() else None,
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a checkpoint or model card")
    parser.add_argument("--sites", required=True, help="the sites' caches, comma-separated")
    parser.add_argument("--external", type=Path, required=True, help="the external cache")
    parser.add_argument(
        "--held-out", default="", help="caches of more patients of the sites, comma-separated"
    )
    parser.add_argument(
        "--bins",
        type=int,
        default=None,
        help="histogram bins of the operating point (default: the card's run config's "
        f"operating-point-bins, else {DEFAULT_BINS})",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "calibration.json")
    args = parser.parse_args()
    sites = [Path(s) for s in args.sites.split(",") if s]
    try:
        held_out = [Path(c) for c in args.held_out.split(",") if c]
        if args.bins is not None and args.bins < 1:
            raise ValueError(f"--bins {args.bins}: must be at least 1")
        figures = measure(args.model, sites, args.external, held_out, args.bins)
    except (CheckpointLoadError, CacheError, OSError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), **figures}, indent=2) + "\n")
    calibration = figures["calibration"]
    title = f"temperature {calibration['temperature']:.3g}, chosen on {calibration['chosen_on']}"
    table = Table(title=title)
    for column in ("set", "scans", "ECE before", "after", "perfect would show", "AUC after"):
        table.add_column(column, justify="right")
    counts = {
        "pooled_test": figures["pooled_test_scans"],
        "external": figures["external_scans"],
        "held_out": figures["held_out_scans"],
    }
    for name in figures["after"]:
        if name == "temperature":
            continue
        before, after = figures["before"][name], figures["after"][name]
        floor = after["ece_noise_floor"]
        table.add_row(
            name,
            str(counts[name]),
            f"{before['ece']:.3f}",
            f"{after['ece']:.3f}",
            f"{floor['median']:.3f} ({floor['p5']:.3f}–{floor['p95']:.3f})",
            f"{after['auc']:.3f}",
        )
    Console().print(table)
    ext = figures["after"]["external"]
    print(
        f"external at the federated operating point on calibrated probabilities: threshold "
        f"{ext['threshold']:.3g}, sensitivity {ext['sens']:.3f}, specificity {ext['spec']:.3f}"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
