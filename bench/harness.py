"""What the benchmarks share: the demo's data and run config, fresh run directories and
simulations of them, per-round figures, where results go, and the machine they ran on."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedct.common.cache.store import CacheError
from fedct.common.run.directory import CheckpointError, RunDirectory
from fedct.server.launch.demo import demo_run_config, load_config, resources
from fedct.server.launch.simulate import (
    Resources,
    SimulateError,
    apply_assignments,
    resolve_paths,
    simulate,
)

RESULTS = Path(__file__).parent / "results"

RUNS = RESULTS / "runs"


class BenchError(RuntimeError):
    """A run of the benchmark did not finish."""


# What a bad config, a foreign cache or a failed run raise (DemoError is a ValueError).
BENCH_ERRORS = (
    BenchError,
    SimulateError,
    CacheError,
    CheckpointError,
    ValueError,
    KeyError,
    OSError,
)


@dataclass(frozen=True)
class DemoRun:
    """The demo's run config (paths absolute, ``--set`` applied) and simulation resources."""

    overrides: dict[str, Any]
    resources: Resources


def prepare_demo(config_path: Path, assignments: list[str]) -> DemoRun:
    """The demo cohort and caches of ``config_path`` (reused when present) and its run config
    with ``assignments`` applied on top."""
    config = load_config(config_path)
    overrides = resolve_paths(apply_assignments(demo_run_config(config), assignments))
    return DemoRun(overrides, resources(config))


def add_demo_arguments(parser: argparse.ArgumentParser, out: Path) -> None:
    """``--config``, ``--set`` and ``--out``, the arguments of every federated benchmark."""
    parser.add_argument("--config", type=Path, default=Path("configs/demo.toml"))
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one run-config key of the config's [run] (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=out, help="the JSON file of the figures")


def cpu_model() -> str:
    """The CPU's model name (floating-point results and speeds differ between kinds)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown"
    names = (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    return next(names, platform.processor() or "unknown")


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "platform": f"{platform.machine()} {platform.system()}",
        "cpu": cpu_model(),
        "cores": os.cpu_count() or 1,
        "python": sys.version.split()[0],
    }


def fresh_run_dir(path: Path) -> Path:
    """``path`` made absolute and emptied of an earlier run of the benchmark."""
    path = path.resolve()
    shutil.rmtree(path, ignore_errors=True)
    return path


def simulate_fresh(demo: DemoRun, run_dir: Path, **changes: Any) -> tuple[RunDirectory, float]:
    """Simulate the demo run with ``changes`` in a fresh ``run_dir``; the run and its wall
    seconds (Flower start-up included)."""
    path = fresh_run_dir(run_dir)
    began = time.perf_counter()
    code = simulate({**demo.overrides, **changes, "run-dir": str(path)}, resources=demo.resources)
    seconds = time.perf_counter() - began
    if code != 0:
        raise BenchError(f"the simulation in {path} did not finish")
    return RunDirectory(path), seconds


def external_aucs(central: dict[str, Any]) -> dict[str, float | None]:
    """``<set>-auc_covid`` of a central evaluation, by external set."""
    return {
        key.removesuffix("-auc_covid"): value
        for key, value in sorted(central.items())
        if key.endswith("-auc_covid")
    }


def round_figures(line: dict[str, Any], card: dict[str, Any]) -> dict[str, Any]:
    """Wall time against the slowest participant's training, and bytes per client, of a round."""
    participants = card.get("train", {}).get("participants", [])
    slowest = max(participants, key=lambda p: p["metrics"]["train-seconds"], default=None)
    slowest_seconds = slowest["metrics"]["train-seconds"] if slowest else None
    n = len(participants)
    return {
        "round": line["round"],
        "participants": n,
        "failures": line.get("failures", 0),
        "seconds": line["seconds"],
        "slowest_site": slowest["site"] if slowest else None,
        "slowest_train_seconds": slowest_seconds,
        "ratio": line["seconds"] / slowest_seconds if slowest_seconds else None,
        "train_phase_seconds": line.get("train-phase-seconds"),
        "train_phase_ratio": ratio(line.get("train-phase-seconds"), slowest_seconds),
        "upload_bytes_per_client": line["upload-bytes"] / n if n else None,
        # Every node sampled gets the same weights; the count is exact when none failed.
        "download_bytes_per_client": (
            line["download-bytes"] / n if n and not line.get("failures") else None
        ),
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)
