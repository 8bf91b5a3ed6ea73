"""``fedct demo``: synthesize hospitals, prepare them, run a federation (its baselines if asked).

The whole product on one machine, from one TOML file (``configs/demo.toml``): a seeded
synthetic cohort of non-IID hospitals and a MosMedData-like external set (``[synth]``), a
site-local cache per hospital and one for the external set (``[prepare]``), then a Flower
simulation with one SuperNode per site, central evaluation on the external set every round
and a checkpoint + model card per round (``[run]``: run-config keys); with
``[baselines] run = true`` also the baselines with the same model, epochs and seed —
centralized on the pooled sites and each site alone — and one table comparing their external
AUCs (``baselines.json``; configs/demo.toml leaves them to ``make bench`` for time).
Steps already done (same cohort, caches with the same settings) are reused, so a second
``make demo`` goes straight to training.  Ctrl-C, SIGTERM and SIGHUP stop whichever step runs
(its worker processes, or the simulation's Flower processes) with one line; the rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import time
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedct.common.cache.config import RUN_CONFIG_KEYS, PrepareConfig
from fedct.common.cache.prepare import PrepareInterrupted, interrupted_line, prepare
from fedct.common.cache.qa import print_summary
from fedct.common.cache.store import CacheError
from fedct.common.console import err, out
from fedct.common.stop_signals import exit_status, stopped_by
from fedct.common.synth.cohort import synthesize
from fedct.server.launch.baselines import compare_with_baselines, comparison_rows, comparison_table
from fedct.server.launch.simulate import Resources, SimulateError, resolve_paths, simulate
from fedct.server.run_summary import print_run_summary
from fedct.server.settings import SettingsError

console = err
EXTERNAL = "mosmed"


class DemoError(ValueError):
    """The demo config is unusable, or its output folders hold something else."""


def load_config(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            config = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DemoError(f"{path}: cannot read the demo config ({exc})") from exc
    missing = {"synth", "prepare", "run"} - set(config)
    if missing:
        raise DemoError(f"{path}: missing section(s) {', '.join(sorted(missing))}")
    return config


def ensure_cohort(synth: dict[str, Any]) -> Path:
    """The synthetic cohort of ``[synth]``, written unless the same one is already there."""
    out = Path(synth["out"])
    record = out / "cohort.json"
    wanted = {"profile": synth["profile"], "seed": synth["seed"]}
    scans = synth.get("scans-per-site")
    mosmed = synth.get("mosmed-studies")
    for key, value in (("scans_per_site", scans), ("mosmed_studies", mosmed)):
        if value is not None:
            wanted[key] = value
    if record.exists():
        existing = json.loads(record.read_text())
        same = all(existing.get(k) == v for k, v in wanted.items())
        if same and len(existing.get("sites", {})) == synth["sites"]:
            console.print(f"reusing the synthetic cohort in {out}")
            return out
        raise DemoError(f"{out} holds another cohort ({record}); remove it or change [synth] out")
    summary = synthesize(
        out,
        synth["profile"],
        sites=synth["sites"],
        scans_per_site=scans,
        mosmed_studies=mosmed,
        seed=synth["seed"],
    )
    console.print(summary.line())
    return out


class DemoInterrupted(Exception):
    """A step was stopped by Ctrl-C or a stop signal; the message is its one line."""


def prepare_all(cohort: Path, settings: dict[str, Any]) -> tuple[list[Path], Path]:
    """A cache per site (train/tune/test) and one for the external set (all test)."""
    out = Path(settings["out"])
    cfg = prepare_config(settings)
    sites = sorted(p for p in (cohort / "sites").iterdir() if p.is_dir())
    jobs = [(site, out / site.name, cfg, site / "labels.csv") for site in sites]
    external = out / EXTERNAL
    external_cfg = replace(cfg, splits=(0.0, 0.0, 1.0))
    jobs.append((cohort / "external" / EXTERNAL, external, external_cfg, None))
    for raw, cache, job_cfg, labels in jobs:
        try:
            prepare(raw, cache, job_cfg, labels=labels)
        except PrepareInterrupted as stop:
            raise DemoInterrupted(interrupted_line(stop, cache)) from None
        print_summary(cache, console)
    return [cache for _, cache, _, _ in jobs[:-1]], external


def prepare_config(settings: dict[str, Any]) -> PrepareConfig:
    """The cache settings of ``[prepare]`` (size, fraction, normalize, lung_crop), defaults
    for those it leaves out."""
    return PrepareConfig(**{name: settings[name] for name in RUN_CONFIG_KEYS if name in settings})


def demo_run_config(config: dict[str, Any]) -> dict[str, Any]:
    """Synthesize and prepare what ``config`` describes (reusing what is there) and return the
    run-config overrides of its ``[run]`` section with the caches and preprocessing filled in
    (paths absolute)."""
    cohort = ensure_cohort(config["synth"])
    sites, external = prepare_all(cohort, config["prepare"])
    prepared = prepare_config(config["prepare"])
    run = dict(config["run"])
    run.setdefault("run-dir", f"demo/runs/{time.strftime('%Y%m%d-%H%M%S')}")
    return resolve_paths(
        {
            **run,
            "site-caches": ",".join(map(str, sites)),
            "external-caches": f"{EXTERNAL}={external}",
            **{key: getattr(prepared, name) for name, key in RUN_CONFIG_KEYS.items()},
        }
    )


def resources(config: dict[str, Any]) -> Resources:
    """The ``[simulation]`` section: ``client-cpus``, ``client-gpus`` and ``cpus``."""
    section = config.get("simulation", {})
    cpus = section.get("cpus")
    return Resources(
        int(section.get("client-cpus", 1)),
        float(section.get("client-gpus", 0.0)),
        None if cpus is None else int(cpus),
    )


def run_demo(config_path: Path, *, verbose: bool = False) -> int:
    began = time.perf_counter()
    config = load_config(config_path)
    overrides = demo_run_config(config)
    prepared = time.perf_counter()
    code = simulate(overrides, resources=resources(config), verbose=verbose, summary=False)
    federated = time.perf_counter()
    if code != 0:
        return code
    run_dir = Path(overrides["run-dir"])
    timings = [f"data {prepared - began:.0f} s", f"federated {federated - prepared:.0f} s"]
    comparison = None
    if config.get("baselines", {}).get("run", True):
        comparison = compare_with_baselines(overrides, run_dir)
        timings.append(f"baselines {time.perf_counter() - federated:.0f} s")

    def comparison_and_timings() -> None:
        if comparison is not None:
            rows = comparison_rows(comparison)
            out.print(comparison_table(rows, comparison["external"], comparison["selected_by"]))
        out.print(f"demo: {', '.join(timings)}", highlight=False)

    print_run_summary(run_dir, between=comparison_and_timings)
    if comparison is None:
        out.print(
            "baselines (centralized, each site alone): not run by the demo ([baselines] run = "
            "false) to keep it short; make bench runs them (python -m bench.fl_vs_baselines)",
            markup=False,
            highlight=False,
        )
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return run_demo(args.config, verbose=args.verbose)
    except (DemoError, SimulateError, SettingsError, CacheError, KeyError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    except DemoInterrupted as stop:
        console.print(f"demo {stop}", highlight=False)
        return exit_status()
    except KeyboardInterrupt:
        console.print(
            f"demo interrupted ({stopped_by()}); run the same command again: finished steps "
            "are reused",
            highlight=False,
        )
        return exit_status()
