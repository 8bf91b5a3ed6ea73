"""``fedct train``: the centralized and single-site baselines of a federated run.

Same model, same settings and the same number of epochs as the federated run described by
the run config (``num-server-rounds`` × ``local-epochs``), written in the same run-directory
format (a checkpoint, model card and metrics line per "round" of ``local-epochs`` epochs,
central evaluation on the external caches every round, round 0 included), so that
federated results can be read against them.

- ``--mode centralized``: all sites' train splits pooled in one place (the upper bound a
  federation tries to approach, and what data-sharing rules forbid in practice);
- ``--mode local --site NAME``: one hospital alone on its own data.

The tune/test metrics of each round are computed on the pooled tune/test splits of the sites
used (``federated`` in metrics.jsonl, as for a federated run).  Like a federated run, each
round prints its progress line and writes TensorBoard events into the run directory.

:func:`compare_with_baselines` trains every baseline of a finished federated run and writes
its ``baselines.json``: each arm's external AUC with its 95 % CI, at the round its own tuning
data pick (``best-metric``) and at its last round.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table
from torch.utils.data import ConcatDataset

from fedct.common.cache.dataset import CacheDataset, make_loader, pooled
from fedct.common.cache.store import CacheError, check_run_settings
from fedct.common.console import err, flower_lines_hidden, out
from fedct.common.provenance import software_versions
from fedct.common.run.directory import RunDirectory, round_record
from fedct.common.training.loop import score_split, train_local
from fedct.server.central_eval import CentralEvaluator
from fedct.server.global_model import GlobalModel
from fedct.server.launch.simulate import SimulateError, build_run_config
from fedct.server.progress import ProgressLine
from fedct.server.run_summary import print_run_summary
from fedct.server.settings import ServerSettings, SettingsError, app_defaults
from fedct.server.tensorboard_log import TensorBoardLog

console = err


def _split_metrics(
    model: GlobalModel, caches: list[Path], split: str, settings: ServerSettings
) -> dict[str, float]:
    scores, _ = score_split(
        model.model,
        pooled(caches, [split]),
        split,
        batch_size=settings.training.batch_size,
        device=settings.device,
    )
    return scores


def select_caches(site_caches: list[Path], mode: str, site: str | None) -> list[Path]:
    """All site caches (centralized) or the one named ``site`` (by folder name or index)."""
    if mode == "centralized":
        return site_caches
    if site is None:
        raise SettingsError("--mode local needs --site NAME (a site cache's folder name)")
    for index, cache in enumerate(site_caches):
        if site in (cache.name, str(index)):
            return [cache]
    names = ", ".join(cache.name for cache in site_caches)
    raise SettingsError(f"--site {site!r} is none of the site caches ({names})")


@flower_lines_hidden()
def train_baseline(overrides: dict[str, Any], mode: str, site: str | None) -> RunDirectory:
    """Train and record a baseline run; returns its run directory."""
    run_config = {**app_defaults(), **overrides}
    settings = ServerSettings.from_run_config(run_config)
    caches = select_caches(
        [Path(p) for p in str(run_config["site-caches"]).split(",") if p], mode, site
    )
    for cache in caches:
        check_run_settings(cache, run_config)
    site_train = {
        c.name: CacheDataset(c, ["train"], max_slices=settings.train_max_slices, seed=settings.seed)
        for c in caches
    }
    train = ConcatDataset(list(site_train.values()))
    if len(train) == 0:
        raise SettingsError(f"no training scans in {', '.join(map(str, caches))}")
    counts = np.sum([data.class_counts() for data in site_train.values()], axis=0)
    model = GlobalModel(settings.model, settings.seed)
    evaluator = CentralEvaluator.for_run(model, settings)
    run_dir = RunDirectory(settings.run_dir)
    run_key = run_dir.claim()
    run_dir.write_json(
        "run_config.json",
        {
            "run_key": run_key,
            "mode": mode,
            "sites": [c.name for c in caches],
            "run_config": run_config,
        },  # fmt: skip
    )
    training = settings.training
    progress = ProgressLine(run_dir, settings.num_rounds, out.print)
    tensorboard = TensorBoardLog(run_dir, 0, run_config)
    for server_round in range(settings.num_rounds + 1):
        started = time.monotonic()
        train_metrics: dict[str, Any] = {}
        if server_round > 0:
            cfg = replace(training, seed=settings.seed + server_round)
            loader = make_loader(train, cfg.batch_size, shuffle=True, seed=cfg.seed)
            result = train_local(model.model, loader, cfg, class_counts=counts.tolist())
            train_metrics = {
                "train-loss": result.loss,
                "train-accuracy": result.accuracy,
                "train-seconds": result.seconds,
            }
        model.model.eval()
        federated = {
            **_split_metrics(model, caches, "tune", settings),
            **_split_metrics(model, caches, "test", settings),
        }
        card, line = round_record(
            strategy=mode,
            model_config=asdict(settings.model),
            run_config=run_config,
            train=train_metrics,
            train_metrics=train_metrics,
            federated=federated,
            central=evaluator(),
            seconds=time.monotonic() - started,
            sites={name: len(data) for name, data in site_train.items()},
            card={"software": software_versions()},
        )
        run_dir.save_round(
            server_round, model.full_state(), card, line, {}, best_metric=settings.best_metric
        )
        progress(server_round, card, line)
        tensorboard(server_round, card, line)
    tensorboard.close()
    return run_dir


BASELINES_FILE = "baselines.json"


def external_result(run_dir: RunDirectory, external: str) -> dict[str, Any]:
    """An arm's external AUC and 95 % CI at the round ``best.json`` names (``round``) and at
    its last round (``final``); the best round falls back to the last when no round had a
    finite tune metric."""
    metrics = {line["round"]: line for line in run_dir.metrics()}
    if not metrics:
        raise SettingsError(f"{run_dir.path}: no rounds recorded")
    last = max(metrics)
    best = (run_dir.read_json("best.json") or {}).get("round", last)

    def at(server_round: int) -> dict[str, Any]:
        central = metrics[server_round].get("central", {})
        return {
            "round": server_round,
            "auc": central.get(f"{external}-auc_covid"),
            "ci": [
                central.get(f"{external}-auc_covid_ci_low"),
                central.get(f"{external}-auc_covid_ci_high"),
            ],
        }

    return {**at(best), "final": at(last)}


def compare_with_baselines(overrides: dict[str, Any], federated: Path) -> dict[str, Any]:
    """Train the centralized and every single-site baseline of the federated run in
    ``federated`` (same run config: model, epochs, seed) under ``federated/baselines/``, and
    write the comparison on the first external set to ``federated/baselines.json``."""
    run_config = {**app_defaults(), **overrides}
    externals = ServerSettings.from_run_config(run_config).external_caches
    if not externals:
        raise SettingsError("baselines are compared on an external set: external-caches is empty")
    external = next(iter(externals))
    sites = [Path(p).name for p in str(run_config["site-caches"]).split(",") if p]
    arms = [("centralized", "centralized", None), *[(site, "local", site) for site in sites]]
    results: dict[str, dict[str, Any]] = {}
    for name, mode, site in arms:
        began = time.monotonic()
        run_dir = train_baseline(
            {**overrides, "run-dir": str(federated / "baselines" / name)}, mode, site
        )
        seconds = round(time.monotonic() - began, 1)
        results[name] = {**external_result(run_dir, external), "seconds": seconds}
        console.print(
            f"baseline {name}: {seconds:.0f} s, {external} AUC "
            f"{auc_text(results[name])} at round {results[name]['round']}",
            highlight=False,
        )
    comparison = {
        "external": external,
        "selected_by": run_config["best-metric"],
        "federated": external_result(RunDirectory(federated), external),
        "centralized": results.pop("centralized"),
        "local": results,
    }
    RunDirectory(federated).write_json(BASELINES_FILE, comparison)
    return comparison


def auc_text(result: dict[str, Any]) -> str:
    """``0.931 (0.897–0.958)``: an arm's AUC with its CI, as far as they are defined."""
    low, high = result["ci"]
    if result["auc"] is None:
        return "–"
    if low is None or high is None:
        return f"{result['auc']:.3f}"
    return f"{result['auc']:.3f} ({low:.3f}–{high:.3f})"


def comparison_rows(comparison: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The arms of baselines.json by display name: federated, centralized, each site alone."""
    return {
        "federated": comparison["federated"],
        "centralized": comparison["centralized"],
        **{f"{site} alone": result for site, result in comparison["local"].items()},
    }


def comparison_table(rows: dict[str, dict[str, Any]], external: str, selected_by: str) -> Table:
    """One row per arm: the external AUC with its CI at the round the arm's tuning data pick
    and at its last round, and its seconds where recorded."""
    table = Table(
        title=f"federated against its baselines: {external} AUC (95 % CI)",
        caption=f"round: picked by {selected_by} on each arm's own tuning data",
    )
    timed = any("seconds" in row for row in rows.values())
    columns = ("run", "round", "AUC (95 % CI)", "last round", "AUC (95 % CI) ")
    for column in columns + (("s",) if timed else ()):
        table.add_column(column, justify="left" if column == "run" else "right")
    for name, row in rows.items():
        final = row["final"]
        cells = [name, str(row["round"]), auc_text(row), str(final["round"]), auc_text(final)]
        if timed:
            cells.append("–" if row.get("seconds") is None else f"{row['seconds']:.0f}")
        table.add_row(*cells)
    return table


def run(args: argparse.Namespace) -> int:
    try:
        overrides = build_run_config(args.config, args.set)
        run_dir = train_baseline(overrides, args.mode, args.site)
    except (SimulateError, SettingsError, CacheError, ValueError, OSError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    what = "centralized baseline" if args.mode == "centralized" else f"local baseline {args.site}"
    print_run_summary(run_dir.path, title=f"{what}: rounds of local-epochs epochs")
    return 0
