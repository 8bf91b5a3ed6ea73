"""A reference classifier without deep learning: how much signal the demo cohort carries.

Each scan becomes the normalised histogram of its cached pixel values (32 bins over the
whole value range); a logistic regression (scikit-learn) is fitted on the pooled ``train``
splits of the sites and scored, COVID-19 vs rest, on the sites' pooled ``test`` splits and on
every external cache.  It sees every site's data at once, so it is a centralized reference
for the federated model, not a federated method.  Prints one table and writes
bench/results/intensity_baseline.json.

    python -m bench.intensity_baseline [--config configs/demo.toml] [--c 1000]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from torch.utils.data import Dataset

from bench.harness import BENCH_ERRORS, machine, prepare_demo
from fedct.common.cache.dataset import CacheDataset, ScanItem, pooled
from fedct.common.classes import GLOBAL_CLASSES

RESULTS = Path(__file__).parent / "results"
BINS = 32
COVID = GLOBAL_CLASSES.index("covid19")


def histograms(data: Dataset[ScanItem]) -> tuple[np.ndarray, np.ndarray]:
    """(one normalised histogram per scan, labels); pixels are the model's input values."""
    features, labels = [], []
    for index in range(len(data)):  # type: ignore[arg-type]
        item = data[index]
        values = item.pixels[:, 0].numpy()
        counts, _ = np.histogram(values, bins=BINS, range=(-2.2, 2.7))
        features.append(counts / max(1, counts.sum()))
        labels.append(item.label)
    return np.array(features), np.array(labels)


def pooled_histograms(caches: list[Path], splits: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return histograms(pooled(caches, splits))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.toml"))
    parser.add_argument("--c", type=float, default=1000.0, help="inverse L2 strength")
    parser.add_argument("--out", type=Path, default=RESULTS / "intensity_baseline.json")
    args = parser.parse_args()
    try:
        demo = prepare_demo(args.config, [])
    except BENCH_ERRORS as exc:
        sys.exit(f"error: {exc}")
    sites = [Path(p) for p in demo.overrides["site-caches"].split(",")]
    external = dict(
        entry.split("=", 1) for entry in demo.overrides["external-caches"].split(",") if entry
    )
    features, labels = pooled_histograms(sites, ["train"])
    model = LogisticRegression(C=args.c, max_iter=20000).fit(features, labels)

    def auc(x: np.ndarray, y: np.ndarray) -> float:
        return float(roc_auc_score(y == COVID, model.predict_proba(x)[:, COVID]))

    scores = {"sites' test splits": auc(*pooled_histograms(sites, ["test"]))}
    for name, path in external.items():
        scores[name] = auc(*histograms(CacheDataset(Path(path))))
    table = Table(title=f"intensity histogram + logistic regression (C = {args.c:g})")
    table.add_column("scored on")
    table.add_column("AUC COVID-19 vs rest", justify="right")
    for name, value in scores.items():
        table.add_row(name, f"{value:.3f}")
    Console().print(table)
    print(f"fitted on {len(labels)} training scans of {len(sites)} sites")
    result = {
        "config": str(args.config),
        "c": args.c,
        "bins": BINS,
        "train_scans": len(labels),
        "auc": scores,
        "machine": machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
