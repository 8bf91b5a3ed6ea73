"""What a finished run prints last: the table of its rounds with the best round marked, then
where everything is and what to run next.

``fedct simulate`` and ``fedct train`` end with :func:`print_run_summary`; ``fedct demo``
calls it once its runs are done.  Everything goes to stdout, except the line saying that a
run did not finish (stderr).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedct.common.console import out
from fedct.common.run.directory import RunDirectory
from fedct.server.progress import external_sets, metric_label
from fedct.server.settings import parse_external_caches

BEST_MARK = "◀ best"


def _fmt(value: Any) -> str:
    return "–" if not isinstance(value, int | float) or value != value else f"{value:.3f}"


def _interval(central: dict[str, Any], name: str) -> str:
    """The 95 % CI of the set's AUC, when the round recorded one."""
    low, high = (central.get(f"{name}-auc_covid_ci_{end}") for end in ("low", "high"))
    if not (isinstance(low, float) and isinstance(high, float)):
        return "–"
    return f"{low:.2f}–{high:.2f}"


def round_table(
    metrics: list[dict[str, Any]], title: str = "federated rounds", best_round: int | None = None
) -> Table:
    """Rows of metrics.jsonl: sites, train loss, tune AUC, AUC and its 95 % CI per external
    set, and the best round marked."""
    externals = sorted({name for line in metrics for name in external_sets(line)})
    table = Table(title=title)
    for column in ("round", "sites", "train loss", "tune AUC"):
        table.add_column(column, justify="right")
    for name in externals:  # the sets' losses are in metrics.jsonl, TensorBoard and the report
        table.add_column(f"{name} AUC", justify="right")
        table.add_column("95 % CI", justify="right")
    table.add_column("", justify="left")
    for line in metrics:
        kept = " (kept previous)" if line.get("kept_previous_model") else ""
        central = line.get("central", {})
        row = [
            str(line["round"]),
            f"{len(line.get('sites', {}))}{kept}",
            _fmt(line.get("train", {}).get("train-loss")),
            _fmt(line.get("federated", {}).get("tune-auc_covid")),
        ]
        for name in externals:
            row += [_fmt(central.get(f"{name}-auc_covid")), _interval(central, name)]
        best = line["round"] == best_round
        table.add_row(*row, BEST_MARK if best else "", style="bold" if best else None)
    return table


def next_commands(
    run_dir: Path, recorded: dict[str, Any], chosen: dict[str, Any] | None
) -> list[str]:
    """The commands that look at a finished run: its report, an evaluation of the ``chosen``
    checkpoint (best.json's, else latest.json's) on its first external set, TensorBoard over
    its folder of runs, Flower's own record of it (when it was a Flower run)."""
    path = Path(run_dir).resolve()
    commands = [f"fedct report {shlex.quote(str(path))}"]
    if chosen:
        weights = shlex.quote(str(path / chosen["checkpoint"]))
        external = parse_external_caches(
            str(recorded.get("run_config", {}).get("external-caches", ""))
        )
        data = shlex.quote(str(next(iter(external.values())))) if external else "CACHE_OR_RAW"
        out_dir = shlex.quote(str(path / f"eval-round_{int(chosen['round']):03d}"))
        commands.append(f"fedct evaluate --model {weights} --data {data} --out {out_dir}")
    commands.append(f"tensorboard --logdir {shlex.quote(str(path.parent))}")
    if recorded.get("flower_run_id") is not None and (path / "flower").is_dir():
        commands.append(f"fedct flwr {shlex.quote(str(path))} log")
    return commands


def run_finished(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` recorded every round its run config asks for."""
    directory = RunDirectory(run_dir)
    metrics = directory.metrics()
    recorded = directory.read_json("run_config.json") or {}
    wanted = int(recorded.get("run_config", {}).get("num-server-rounds", 0))
    return bool(metrics) and wanted > 0 and metrics[-1]["round"] >= wanted


def print_run_summary(
    run_dir: Path,
    *,
    title: str = "federated rounds",
    console: Console = out,
    between: Callable[[], None] | None = None,
) -> bool:
    """Print the rounds table, then (after ``between``, e.g. another table) the best round
    and its checkpoint, the run directory and the next commands; returns whether every round
    of the run config was recorded."""
    directory = RunDirectory(run_dir)
    metrics = directory.metrics()
    best = directory.read_json("best.json")
    recorded = directory.read_json("run_config.json") or {}
    if metrics:
        console.print(round_table(metrics, title, best["round"] if best else None))
    if between is not None:
        between()
    latest = directory.read_json("latest.json")
    if best:
        label = metric_label(str(best.get("metric")))
        console.print(
            f"best round: {best['round']} ({label} {_fmt(best.get('value'))}), "
            f"checkpoint {Path(run_dir).resolve() / best['checkpoint']}",
            highlight=False,
        )
    elif metrics:
        metric = str(recorded.get("run_config", {}).get("best-metric", "tune-auc_covid"))
        console.print(
            f"best round: none, {metric_label(metric)} ({metric}) was never defined (e.g. no "
            "tune split with both COVID-19 and other scans); the commands below use the "
            "latest round",
            highlight=False,
        )
    console.print(f"run directory: {Path(run_dir).resolve()}", highlight=False)
    if metrics:
        console.print("next:", highlight=False)
        for command in next_commands(run_dir, recorded, best or latest):
            console.print(f"  {command}", markup=False, highlight=False)
    return run_finished(run_dir)
