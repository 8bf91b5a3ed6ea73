"""How balanced splits that never move stay, against the sort-and-cut split they replaced.

fedct's split (common/cache/splits.py) puts each patient in a split by a seeded hash of the
patient alone, so adding patients never moves anyone; its stratification holds in
expectation only.  The rule it replaced sorted each class's patients by the same hash and
cut the list at the fractions: exact counts per class, but adding patients shifts the cuts
and moves patients already cached between train and test.  For sites shaped like the demo's
three hospitals (100 patients each, their class mix), over ``--trials`` random sets of
patient ids, this measures for both rules:

- how far each class's share of a split strays from the split's fraction (mean and 95th
  percentile of the absolute difference, in percentage points of that class);
- how often the tune or test split lacks a class, and how often the tune split lacks
  COVID-19 or every other class (then the site's tune AUC cannot be computed);
- how many patients already cached move when an export adds 10 % more patients.

Prints a table and one summary line; writes bench/results/split_balance.json.
Run: ``python -m bench.split_balance``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.cache_check import cpu_model
from bench.harness import RESULTS, machine
from fedct.common.cache.splits import assign_splits
from fedct.common.cache.store import SPLITS

FRACTIONS = (0.7, 0.15, 0.15)  # fedct prepare's default
SITES = {  # patients per class (Normal, pneumonia/abnormal, COVID-19), as `make demo` makes
    "hospital-a": (34, 30, 36),
    "hospital-b": (30, 34, 36),
    "hospital-c": (12, 8, 80),
}
ADDED = 0.10
COVID = 2


def sort_and_cut(patients: Sequence[str], classes: Sequence[int], seed: int) -> list[str]:
    """The rule fedct used before: per class, patients sorted by the seeded hash and cut at
    the fractions (rounded so the totals match best)."""
    by_class: dict[int, list[str]] = defaultdict(list)
    for patient, cls in zip(patients, classes, strict=True):
        by_class[cls].append(patient)
    split_of: dict[str, str] = {}
    for members in by_class.values():
        members.sort(key=lambda p: hashlib.sha256(f"{seed}\0{p}".encode()).digest())
        bounds = np.rint(np.cumsum(FRACTIONS) * len(members)).astype(int)
        for rank, patient in enumerate(members):
            split_of[patient] = SPLITS[int(np.searchsorted(bounds, rank, side="right"))]
    return [split_of[p] for p in patients]


def _hash_rule(patients: Sequence[str], _classes: Sequence[int], seed: int) -> list[str]:
    return assign_splits(patients, FRACTIONS, seed)


RULES = {"hash (fedct now)": _hash_rule, "sort-and-cut (before)": sort_and_cut}


def _cohort(rng: np.random.Generator, counts: Sequence[int]) -> tuple[list[str], list[int]]:
    classes = [cls for cls, n in enumerate(counts) for _ in range(n)]
    patients = [f"PID{rng.integers(1 << 62):x}" for _ in classes]
    return patients, classes


def measure_site(counts: Sequence[int], trials: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    result: dict[str, Any] = {}
    for name, rule in RULES.items():
        deviations: list[float] = []
        missing = {"tune": 0, "test": 0}
        no_tune_auc = 0
        moved: list[float] = []
        for trial in range(trials):
            patients, classes = _cohort(rng, counts)
            splits = rule(patients, classes, trial)
            for cls, n in enumerate(counts):
                mine = [s for s, c in zip(splits, classes, strict=True) if c == cls]
                for split, fraction in zip(SPLITS, FRACTIONS, strict=True):
                    deviations.append(abs(mine.count(split) / n - fraction) * 100)
            for split in missing:
                present = {c for s, c in zip(splits, classes, strict=True) if s == split}
                missing[split] += len(present) < len(counts)
                if split == "tune":
                    no_tune_auc += COVID not in present or present <= {COVID}
            more, more_classes = _cohort(rng, [max(1, round(n * ADDED)) for n in counts])
            grown = rule(patients + more, classes + more_classes, trial)[: len(patients)]
            moved.append(100 * np.mean([a != b for a, b in zip(splits, grown, strict=True)]))
        result[name] = {
            "class_share_deviation_pp_mean": round(float(np.mean(deviations)), 2),
            "class_share_deviation_pp_p95": round(float(np.percentile(deviations, 95)), 2),
            "tune_lacks_a_class_percent": round(100 * missing["tune"] / trials, 2),
            "test_lacks_a_class_percent": round(100 * missing["test"] / trials, 2),
            "tune_auc_undefined_percent": round(100 * no_tune_auc / trials, 2),
            "patients_moved_by_10pct_more_percent": round(float(np.mean(moved)), 2),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=500)
    parser.add_argument("--out", type=Path, default=RESULTS / "split_balance.json")
    args = parser.parse_args()
    sites = {
        site: measure_site(counts, args.trials, seed)
        for seed, (site, counts) in enumerate(SITES.items())
    }
    print(
        f"{'site':<11} {'rule':<22} dev mean/p95 (pp)  tune/test lack a class  no tune AUC  moved"
    )
    for site, rules in sites.items():
        for name, row in rules.items():
            mean, p95, tune, test, no_auc, moved = row.values()
            print(
                f"{site:<11} {name:<22} {mean:>5} / {p95:<10} {tune:>6} % / {test:<6} %      "
                f"{no_auc:>5} %      {moved} %"
            )
    print(
        f"split balance: {args.trials} trials per site, fractions {FRACTIONS}, "
        f"{cpu_model()}; hash rule moves nobody, sort-and-cut moves patients"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = {"machine": machine(), "trials": args.trials, "fractions": FRACTIONS, "sites": sites}
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
