"""Federated training against its baselines: external AUC on the demo cohort, per strategy.

Prepares the demo's data as ``fedct demo`` does (cohort and caches reused when present), runs
the federation of the config's ``[run]`` section once per strategy of ``--strategies``
(``fedct simulate``), then the baselines ``fedct demo`` runs — centralized on the pooled site
caches and each site alone, same model, settings, seed and epochs
(``fedct.server.launch.baselines.compare_with_baselines``).  Prints one table — each arm's
external AUC with its 95 % CI at the round its own tuning data pick and at its last round,
and the seconds taken — and writes the figures to bench/results/fl_vs_baselines.json.

    python -m bench.fl_vs_baselines [--config configs/demo.toml] [--strategies fedavg,fedbn]
        [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console

from bench.harness import (
    BENCH_ERRORS,
    RESULTS,
    RUNS,
    add_demo_arguments,
    machine,
    prepare_demo,
    simulate_fresh,
)
from fedct.server.launch.baselines import (
    compare_with_baselines,
    comparison_rows,
    comparison_table,
    external_result,
)
from fedct.server.settings import app_defaults, parse_external_caches

WORK = RUNS / "fl_vs_baselines"
SECONDS_NOTE = (
    "s: the whole call (a federated run includes starting Flower and the simulated sites)"
)


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
        external = next(iter(parse_external_caches(str(defaults["external-caches"]))))
        rows: dict[str, dict[str, Any]] = {}
        first = None
        for strategy in filter(None, strategies):
            run_dir, seconds = simulate_fresh(
                demo, WORK / f"federated-{strategy}", strategy=strategy
            )
            first = first or run_dir
            arm = external_result(run_dir, external)
            rows[f"federated ({strategy})"] = {**arm, "seconds": round(seconds, 1)}
        if first is None:
            raise ValueError("--strategies names no strategy")
        comparison = compare_with_baselines(demo.overrides, first.path)
    except BENCH_ERRORS as exc:
        sys.exit(f"error: {exc}")
    baselines = comparison_rows(comparison)
    del baselines["federated"]
    rows.update(baselines)
    Console().print(comparison_table(rows, comparison["external"], comparison["selected_by"]))
    print(f"note: {SECONDS_NOTE}.")
    result = {
        "config": str(args.config),
        "set": args.set,
        "run_config": {k: v for k, v in demo.overrides.items() if k != "run-dir"},
        "epochs": defaults["num-server-rounds"] * defaults["local-epochs"],
        "machine": machine(),
        "seconds_note": SECONDS_NOTE,
        "external": comparison["external"],
        "selected_by": comparison["selected_by"],
        "runs": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
