"""Federated training against its baselines: external AUC on the demo cohort.

Prepares the demo's data as ``fedct demo`` does (cohort and caches reused when present), then
trains the model of the config's ``[run]`` section four ways, with the same settings, seed and
total epochs (``num-server-rounds`` × ``local-epochs``): centralized on the pooled site caches
(``fedct train --mode centralized``), each site alone (``--mode local --site X``), and
federated (``fedct simulate``, one run per strategy of ``--strategies``).  Prints one table —
final external AUC per external set, the external AUC at the round ``best.json`` selects (by
``best-metric`` on tuning data), that round, and the seconds taken — and writes the figures
to bench/results/fl_vs_baselines.json.

    python -m bench.fl_vs_baselines [--config configs/demo.toml] [--strategies fedavg,fedbn]
        [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.fl_overhead import (
    BENCH_ERRORS,
    RESULTS,
    RUNS,
    DemoRun,
    add_demo_arguments,
    external_aucs,
    fmt,
    fresh_run_dir,
    machine,
    prepare_demo,
    simulate_fresh,
)
from server.baselines import train_baseline
from server.checkpoints import RunDirectory
from server.settings import app_defaults

WORK = RUNS / "fl_vs_baselines"
SECONDS_NOTE = (
    "wall s: the whole call (a federated run includes starting Flower and the simulated "
    "sites); rounds s: the sum of the rounds' recorded seconds, round 0 included"
)


def summarize_run(run_dir: RunDirectory, wall_seconds: float) -> dict[str, Any]:
    """Final and best-round external AUCs, the best round and the seconds of a finished run."""
    metrics = run_dir.metrics()
    best = run_dir.read_json("best.json") or {}
    best_line = next((line for line in metrics if line["round"] == best.get("round")), None)
    return {
        "run_dir": str(run_dir.path),
        "final_round": metrics[-1]["round"],
        "final_auc": external_aucs(metrics[-1]["central"]),
        "best_metric": best.get("metric"),
        "best_value": best.get("value"),
        "best_round": best.get("round"),
        "best_round_auc": external_aucs(best_line["central"]) if best_line else {},
        "wall_seconds": round(wall_seconds, 3),
        "round_seconds": round(sum(line["seconds"] for line in metrics), 3),
    }


def baseline(demo: DemoRun, name: str, mode: str, site: str | None) -> dict[str, Any]:
    """Train a baseline in a fresh run directory and summarize it."""
    overrides = {**demo.overrides, "run-dir": str(fresh_run_dir(WORK / name))}
    began = time.perf_counter()
    run_dir = train_baseline(overrides, mode, site)
    return summarize_run(run_dir, time.perf_counter() - began)


def run_all(demo: DemoRun, strategies: list[str]) -> dict[str, dict[str, Any]]:
    """Centralized, each site alone, then each federated strategy, by row name."""
    rows = {"centralized": baseline(demo, "centralized", "centralized", None)}
    for cache in demo.overrides["site-caches"].split(","):
        site = Path(cache).name
        rows[f"local:{site}"] = baseline(demo, f"local-{site}", "local", site)
    for strategy in strategies:
        run_dir, seconds = simulate_fresh(demo, WORK / f"federated-{strategy}", strategy=strategy)
        rows[f"federated({strategy})"] = summarize_run(run_dir, seconds)
    return rows


def auc_table(rows: dict[str, dict[str, Any]], best_metric: str) -> Table:
    externals = sorted({name for row in rows.values() for name in row["final_auc"]})
    table = Table(
        title="external AUC (COVID-19 vs rest): federated against its baselines",
        caption=f"<set>: final round; <set>@best and best round: the round best.json selects "
        f"by {best_metric}",
    )
    table.add_column("run", no_wrap=True)
    for name in externals:
        table.add_column(name, justify="right")
        table.add_column(f"{name}@best", justify="right")
    for column in ("best round", "wall s", "rounds s"):
        table.add_column(column, justify="right")
    for label, row in rows.items():
        cells = [label]
        for name in externals:
            cells += [fmt(row["final_auc"].get(name)), fmt(row["best_round_auc"].get(name))]
        best_round = "–" if row["best_round"] is None else str(row["best_round"])
        cells += [best_round, fmt(row["wall_seconds"], ".1f"), fmt(row["round_seconds"], ".1f")]
        table.add_row(*cells)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_demo_arguments(parser, RESULTS / "fl_vs_baselines.json")
    parser.add_argument(
        "--strategies",
        help="comma-separated federated strategies, one row each (default: the config's)",
    )
    args = parser.parse_args()

    try:
        demo = prepare_demo(args.config, args.set)
        defaults = {**app_defaults(), **demo.overrides}
        strategies = [s.strip() for s in (args.strategies or defaults["strategy"]).split(",")]
        rows = run_all(demo, [s for s in strategies if s])
    except BENCH_ERRORS as exc:
        sys.exit(f"error: {exc}")
    Console().print(auc_table(rows, defaults["best-metric"]))
    print(f"note: {SECONDS_NOTE}.")
    result = {
        "config": str(args.config),
        "set": args.set,
        "run_config": {k: v for k, v in demo.overrides.items() if k != "run-dir"},
        "epochs": defaults["num-server-rounds"] * defaults["local-epochs"],
        "machine": machine(),
        "seconds_note": SECONDS_NOTE,
        "runs": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
