"""Federation cost against the number of sites: simulated (3 → 10 → 30) and deployed (3 → 10).

Every site trains timm's ``test_efficientnet`` on its own tiny synthetic cache (8 training
scans of 3 slices at 32 × 32, tests/conftest.py's ``write_tiny_cache``, one seed per site:
every site holds the same amount of data, not the same scans).  Two engines:

* simulation (``fedct simulate``, server/launch/simulate.py): one run of ``--sim-rounds`` rounds per
  size, one CPU per simulated site and ``--cpus`` CPUs in all, so that many sites train at
  once and the others queue.  Round 1 also starts Ray's actors, so a round's figures are the
  median of rounds ≥ 2.
* deployment (tests/plaintext_federation.py): a plaintext SuperLink on 127.0.0.1 with its
  SuperExec, and per site a SuperNode with its own SuperExec, Flower home and cache; one run
  of ``--deploy-rounds`` rounds per size.  Every message starts a ClientApp process on the
  site's side, so every round pays the same and its figures are the median of rounds ≥ 1.

Per round it reads metrics.jsonl and the model card (bench/fl_overhead.py's
:func:`round_figures`): wall time, the phases (train, federated evaluation, central
evaluation, the rest), the slowest site's and the summed ``train-seconds`` the sites report,
and the bytes of weights the coordinator sent (train + evaluate) and received.  A sampler of
/proc (bench/proc_sampler.py) gives the coordinator's CPU seconds per round (between the
cards of two rounds), its processes' peak resident memory, and their read()/write() bytes.
For every figure it gives the growth exponent between two sizes, log(f₂/f₁) / log(N₂/N₁):
1 is linear in the number of sites, above 1 faster.  Prints the tables and a summary line
and writes bench/results/fl_scale.json.

    python -m bench.fl_scale [--sim-sites 3,10,30] [--deploy-sites 3,10] [--sim-rounds 3]
                             [--deploy-rounds 1] [--cpus 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.harness import (
    BENCH_ERRORS,
    RESULTS,
    RUNS,
    BenchError,
    DemoRun,
    fmt,
    fresh_run_dir,
    machine,
    round_figures,
    simulate_fresh,
)
from bench.proc_sampler import ProcessSampler, command_line, session_members
from bench.scale_plan import plan, plan_table
from fedct.common.run.directory import RunDirectory
from fedct.server.launch.simulate import (
    FLOWER_HOME,
    Resources,
    local_flower_processes,
    resolve_paths,
)
from tests.conftest import write_tiny_cache
from tests.deploy_procs import Processes
from tests.plaintext_federation import PlaintextFederation

WORK = RUNS / "fl_scale"
ROLES = ("serverapp", "superlink", "superexec")  # the coordinator's processes
CACHE_SPLITS = {"train": {0: 3, 1: 2, 2: 3}, "tune": {0: 1, 2: 1}, "test": {0: 1, 2: 1}}
EXTERNAL_SPLITS = {"test": {0: 4, 2: 4}}
# The tiny run of the federated tests (tests/conftest.py, tests/plaintext_federation.py).
TINY_RUN = {
    "backbone": "test_efficientnet",
    "image-size": 32,
    "batch-size": 4,
    "lr": 0.01,
    "device": "cpu",
    "cross-site": False,
    "node-wait-timeout": 300.0,
}
SITE_PARTS = ("supernode-", "superexec-")  # PlaintextFederation's names of a site's parts
DEPLOY_TIMEOUT = 1800.0  # a guard against a hung deployment, not a measurement
IDLE_SECONDS = 10.0  # the deployment sampled with every SuperNode online and no run
# The figures whose growth with the number of sites is reported.
GROWTH = (
    "seconds",
    "train_phase_seconds",
    "evaluate_phase_seconds",
    "central_seconds",
    "other_seconds",
    "sum_train_seconds",
    "last_train_reply_seconds",
    "after_last_reply_seconds",
    "median_reply_beyond_train_seconds",
    "coordinator_cpu_seconds",
    "serverapp_cpu_seconds",
    "superlink_cpu_seconds",
    "superlink_io_bytes",
    "coordinator_bytes",
    "serverapp_peak_bytes",
)

# The other figures whose median over the measured rounds is reported.
MEDIANS = (
    "slowest_train_seconds",
    "ratio",
    "train_phase_ratio",
    "first_train_reply_seconds",
    "upload_bytes_per_client",
    "download_bytes_per_client",
    "train_download_bytes",
    "evaluate_download_bytes",
    "upload_bytes",
)


def role_of(command: str) -> str:
    """Which Flower process a command line is."""
    for marker, role in (
        ("flwr-serverapp", "serverapp"),
        ("flwr-simulation", "serverapp"),  # the ServerApp and Ray's driver in one process
        ("flower-superlink", "superlink"),
        ("flower-superexec", "superexec"),
        ("flower-supernode", "supernode"),
        ("flwr-clientapp", "clientapp"),
    ):
        if marker in command:
            return role
    return "ray" if "ray" in command else "other"


def write_caches(root: Path, sites: int) -> tuple[list[Path], Path]:
    """``sites`` tiny site caches and an external set under ``root``."""
    shutil.rmtree(root, ignore_errors=True)
    caches = [write_tiny_cache(root / f"site-{i:03d}", CACHE_SPLITS, seed=i) for i in range(sites)]
    return caches, write_tiny_cache(root / "external", EXTERNAL_SPLITS, seed=10_000)


def card_times(run_dir: RunDirectory) -> dict[int, float]:
    """Round → when its model card was written (time.time())."""
    return {
        line["round"]: run_dir.card_path(line["round"]).stat().st_mtime
        for line in run_dir.metrics()
    }


def round_row(
    run_dir: RunDirectory, line: dict[str, Any], sampler: ProcessSampler, ends: dict[int, float]
) -> dict[str, Any]:
    """One round's figures: fl_overhead's, the phases, the bytes through the coordinator and
    the coordinator's CPU seconds from the previous round's card to this one's."""
    card = run_dir.read_json(run_dir.card_path(line["round"]).name) or {}
    row = round_figures(line, card)
    train_seconds = [p["metrics"]["train-seconds"] for p in card["train"]["participants"]]
    phases = [line["train-phase-seconds"], line["evaluate-phase-seconds"], line["central-seconds"]]
    reply_seconds = card["train"]["reply-seconds"]
    replies = sorted(reply_seconds.values())
    # What a site's reply took beyond its own training: starting its ClientApp (a process in
    # deployment, an actor's turn in simulation), loading the model, the transfers.
    beyond = [
        reply_seconds[p["site"]] - p["metrics"]["train-seconds"]
        for p in card["train"]["participants"]
        if p["site"] in reply_seconds
    ]
    began, ended = ends[line["round"] - 1], ends[line["round"]]
    cpu = {role: sampler.between(role, began, ended) for role in ROLES}
    sent = line["download-bytes"] + line["evaluate-download-bytes"]
    return {
        **row,
        "evaluate_phase_seconds": line["evaluate-phase-seconds"],
        "central_seconds": line["central-seconds"],
        # Waiting for nodes, the roster and the card: the round's time outside the phases.
        "other_seconds": line["seconds"] - sum(phases),
        "sum_train_seconds": sum(train_seconds),
        "first_train_reply_seconds": replies[0] if replies else None,
        "last_train_reply_seconds": replies[-1] if replies else None,
        # Sending, then unpacking and averaging once the last reply is in.
        "after_last_reply_seconds": line["train-phase-seconds"] - replies[-1] if replies else None,
        "median_reply_beyond_train_seconds": statistics.median(beyond) if beyond else None,
        "train_download_bytes": line["download-bytes"],
        "evaluate_download_bytes": line["evaluate-download-bytes"],
        "upload_bytes": line["upload-bytes"],
        "coordinator_bytes": sent + line["upload-bytes"],
        "coordinator_cpu": cpu,
        "coordinator_cpu_seconds": sum(c["cpu_seconds"] for c in cpu.values()),
        "serverapp_cpu_seconds": cpu["serverapp"]["cpu_seconds"],
        "superlink_cpu_seconds": cpu["superlink"]["cpu_seconds"],
        # Every read()/write() syscall of the SuperLink: sockets, its SQLite state, logs.
        "superlink_io_bytes": cpu["superlink"]["read_bytes"] + cpu["superlink"]["written_bytes"],
    }


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def size_figures(
    run_dir: RunDirectory,
    sampler: ProcessSampler,
    sites: int,
    at_once: int,
    first_steady: int,
    wall_seconds: float,
) -> dict[str, Any]:
    """The figures of one run of ``sites`` sites: every round ≥ 1, and the medians of the
    rounds from ``first_steady`` on."""
    ends = card_times(run_dir)
    rows = [round_row(run_dir, line, sampler, ends) for line in run_dir.metrics()[1:]]
    steady = [r for r in rows if r["round"] >= first_steady]
    if not steady or any(r["participants"] != sites for r in steady):
        raise BenchError(f"{run_dir.path}: not every site trained in every measured round")
    median = {key: _median(steady, key) for key in (*GROWTH, *MEDIANS)}
    median["serverapp_peak_bytes"] = sampler.peak_bytes("serverapp")
    median["superlink_peak_bytes"] = sampler.peak_bytes("superlink")
    median["ideal_train_seconds"] = (
        median["sum_train_seconds"] / at_once if median["sum_train_seconds"] else None
    )
    return {
        "sites": sites,
        "sites_at_once": at_once,
        "measured_rounds": [r["round"] for r in steady],
        "wall_seconds": round(wall_seconds, 1),
        "run_dir": str(run_dir.path),
        "processes_seen": sampler.roles(),
        "median": median,
        "rounds": rows,
    }


def simulated(
    sites: int, rounds: int, cpus: int, caches: list[Path], external: Path
) -> dict[str, Any]:
    """One simulation of ``sites`` sites and ``rounds`` rounds, sampled."""
    run_dir = fresh_run_dir(WORK / f"sim-{sites}")
    overrides = {
        **TINY_RUN,
        "num-server-rounds": rounds,
        "site-caches": ",".join(str(c) for c in caches[:sites]),
        "external-caches": f"ext={external}",
        "min-available-nodes": sites,
        "min-train-nodes": sites,
        "min-train-replies": sites,
        "run-dir": str(run_dir),
    }
    resources = Resources(client_cpus=1, cpus=cpus)
    home = run_dir / FLOWER_HOME

    def members() -> dict[int, str]:
        return {pid: role_of(command_line(pid)) for pid in local_flower_processes(home)}

    began = time.perf_counter()
    with ProcessSampler(members) as sampler:
        run, _ = simulate_fresh(DemoRun(resolve_paths(overrides), resources), run_dir)
    at_once = resources.sites_at_once(sites)
    return size_figures(run, sampler, sites, at_once, 2, time.perf_counter() - began)


def deployed(sites: int, rounds: int, caches: list[Path], external: Path) -> dict[str, Any]:
    """One run of ``rounds`` rounds on a loopback deployment of ``sites`` SuperNodes, sampled."""
    root = fresh_run_dir(WORK / f"deploy-{sites}")
    (root / "logs").mkdir(parents=True)
    processes = Processes(root / "logs")
    names = {f"site-{i:03d}": cache for i, cache in enumerate(caches[:sites])}
    began = time.perf_counter()
    try:
        federation = PlaintextFederation.launch(root, processes, names, external)
        launched = time.perf_counter() - began
        sessions = {p.pid: name for name, p in federation.parts.items()}

        def members() -> dict[int, str]:
            return {
                pid: ("site-" if part.startswith(SITE_PARTS) else "") + role_of(command_line(pid))
                for pid, part in session_members(sessions).items()
            }

        with ProcessSampler(members) as idle:
            time.sleep(IDLE_SECONDS)
        keys = {"num-server-rounds": rounds, "min-available-nodes": sites}
        keys |= {"min-train-nodes": sites, "min-train-replies": sites}
        with ProcessSampler(members) as sampler:
            run_id = federation.submit("scale", **keys)
            info = federation.finished(run_id, "scale", rounds, DEPLOY_TIMEOUT)
        if info["status"] != "finished:completed":
            raise BenchError(
                f"the deployed run ended {info['status']}: {info.get('status-details')}"
            )
    except AssertionError as exc:  # the helpers' guards against hanging
        raise BenchError(f"the deployment of {sites} sites: {exc}") from None
    finally:
        processes.stop_all()
    run_dir = RunDirectory(federation.run_dir("scale"))
    figures = size_figures(run_dir, sampler, sites, sites, 1, time.perf_counter() - began)
    figures["launch_seconds"] = round(launched, 1)
    # What the coordinator's processes spend with no run (the SuperNodes' polling, heartbeats).
    figures["idle_cpu_per_second"] = {
        role: idle.cpu_rate(role) for role in ("superlink", "superexec", "site-supernode")
    }
    return figures


def growth(sizes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Between each two consecutive sizes: every GROWTH figure at both, and its exponent
    log(f₂/f₁) / log(N₂/N₁) (1: linear in the sites; above 1: faster)."""
    steps = []
    for small, large in zip(sizes, sizes[1:], strict=False):
        figures = {}
        for key in GROWTH:
            a, b = small["median"].get(key), large["median"].get(key)
            exponent = (
                math.log(b / a) / math.log(large["sites"] / small["sites"])
                if a and b and a > 0 and b > 0
                else None
            )
            figures[key] = {
                "small": a,
                "large": b,
                "ratio": b / a if a else None,
                "exponent": exponent,
            }
        steps.append({"from": small["sites"], "to": large["sites"], "figures": figures})
    return steps


def time_table(title: str, sizes: list[dict[str, Any]]) -> Table:
    """Median round time, its phases, and the sites' own training."""
    table = Table(title=title)
    columns = (
        "sites", "at once", "round s", "train s", "eval s", "central s", "other s",
        "round / slowest site train s", "Σ sites' train s", "train phase / (Σ / at once)",
    )  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    for size in sizes:
        m = size["median"]
        ideal = m["ideal_train_seconds"]
        table.add_row(
            str(size["sites"]),
            str(size["sites_at_once"]),
            fmt(m["seconds"], ".2f"),
            fmt(m["train_phase_seconds"], ".2f"),
            fmt(m["evaluate_phase_seconds"], ".2f"),
            fmt(m["central_seconds"], ".2f"),
            fmt(m["other_seconds"], ".2f"),
            f"{fmt(m['seconds'], '.2f')} / {fmt(m['slowest_train_seconds'], '.2f')} = "
            f"{fmt(m['ratio'], '.1f')}",
            fmt(m["sum_train_seconds"], ".2f"),
            f"{fmt(m['train_phase_seconds'], '.2f')} / {fmt(ideal, '.2f')} = "
            f"{fmt(ratio(m['train_phase_seconds'], ideal), '.1f')}",
        )
    return table


def coordinator_table(title: str, sizes: list[dict[str, Any]]) -> Table:
    """The coordinator's CPU, bytes and memory per median round."""
    table = Table(title=title)
    columns = (
        "sites", "coordinator CPU s", "ServerApp CPU s", "SuperLink CPU s", "MB sent",
        "MB received", "MB / site", "SuperLink I/O MB", "ServerApp peak MiB",
        "SuperLink peak MiB",
    )  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    for size in sizes:
        m = size["median"]
        sent = (m["train_download_bytes"] or 0) + (m["evaluate_download_bytes"] or 0)
        table.add_row(
            str(size["sites"]),
            fmt(m["coordinator_cpu_seconds"], ".2f"),
            fmt(m["serverapp_cpu_seconds"], ".2f"),
            fmt(m["superlink_cpu_seconds"], ".2f"),
            fmt(sent / 1e6, ".2f"),
            fmt(m["upload_bytes"] / 1e6, ".2f"),
            fmt(m["coordinator_bytes"] / 1e6 / size["sites"], ".3f"),
            fmt(m["superlink_io_bytes"] / 1e6, ".1f"),
            fmt(m["serverapp_peak_bytes"] / 2**20, ".0f"),
            fmt(m["superlink_peak_bytes"] / 2**20, ".0f"),
        )
    return table


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def growth_table(title: str, steps: list[dict[str, Any]]) -> Table:
    table = Table(title=title)
    for column in ("figure", *(f"{s['from']} → {s['to']} sites" for s in steps)):
        table.add_column(column, justify="right")
    for key in GROWTH:
        cells = []
        for step in steps:
            f = step["figures"][key]
            cells.append(
                f"{fmt(f['small'], '.4g')} → {fmt(f['large'], '.4g')} "
                f"(×{fmt(f['ratio'], '.2f')}, exponent {fmt(f['exponent'], '.2f')})"
            )
        table.add_row(key, *cells)
    return table


def summary(result: dict[str, Any]) -> str:
    parts = []
    for engine in ("simulation", "deployment"):
        sizes = result[engine]["sizes"]
        if not sizes:
            continue
        first, last = sizes[0]["median"], sizes[-1]["median"]
        parts.append(
            f"{engine} {sizes[0]['sites']} → {sizes[-1]['sites']} sites: round "
            f"{first['seconds']:.2f} → {last['seconds']:.2f} s, coordinator CPU "
            f"{first['coordinator_cpu_seconds']:.2f} → {last['coordinator_cpu_seconds']:.2f} s, "
            f"{first['coordinator_bytes'] / 1e6:.1f} → {last['coordinator_bytes'] / 1e6:.1f} MB "
            f"through it, ServerApp peak {first['serverapp_peak_bytes'] / 2**20:.0f} → "
            f"{last['serverapp_peak_bytes'] / 2**20:.0f} MiB"
        )
    return "; ".join(parts)


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if any(n < 2 for n in sizes) or sizes != sorted(set(sizes)):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected increasing site counts ≥ 2, e.g. 3,10"
        )
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sim-sites", type=_sizes, default=[3, 10, 30], help="default 3,10,30")
    parser.add_argument(
        "--deploy-sites", type=_sizes, default=[3, 10], help="default 3,10; '' skips"
    )
    parser.add_argument(
        "--sim-rounds", type=int, default=3, help="≥ 2: round 1 starts Ray's actors"
    )
    parser.add_argument("--deploy-rounds", type=int, default=1)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="simulation CPUs")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process")
    parser.add_argument("--out", type=Path, default=RESULTS / "fl_scale.json")
    args = parser.parse_args()
    if args.sim_rounds < 2 or args.deploy_rounds < 1 or args.cpus < 1 or args.threads < 1:
        parser.error("--sim-rounds must be ≥ 2, --deploy-rounds, --cpus and --threads ≥ 1")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the simulation's processes inherit it
    console = Console(stderr=True)
    started = time.perf_counter()
    try:
        largest = max([*args.sim_sites, *args.deploy_sites], default=0)
        caches, external = write_caches(WORK / "caches", largest)
        results: dict[str, list[dict[str, Any]]] = {"simulation": [], "deployment": []}
        for sites in args.sim_sites:
            console.print(f"[bold]simulation, {sites} sites, {args.sim_rounds} rounds[/bold]")
            results["simulation"].append(
                simulated(sites, args.sim_rounds, args.cpus, caches, external)
            )
        for sites in args.deploy_sites:
            console.print(
                f"[bold]deployment on 127.0.0.1, {sites} SuperNodes, "
                f"{args.deploy_rounds} round(s)[/bold]"
            )
            results["deployment"].append(deployed(sites, args.deploy_rounds, caches, external))
    except BENCH_ERRORS as exc:
        sys.exit(f"error: {exc}")
    result = {
        "machine": {**machine(), "load_average": os.getloadavg(), "omp_num_threads": args.threads},
        "setup": {
            "backbone": "test_efficientnet, 32 × 32 slices, 3 slices per scan",
            "site_cache": {
                "splits": CACHE_SPLITS,
                "note": "every site its own tiny cache, one seed per site",
            },
            "run_config": TINY_RUN,
            "simulation": {
                "rounds": args.sim_rounds,
                "cpus": args.cpus,
                "client_cpus": 1,
                "measured": "rounds ≥ 2",
            },
            "deployment": {
                "rounds": args.deploy_rounds,
                "measured": "rounds ≥ 1",
                "transport": "plaintext gRPC on 127.0.0.1",
            },
        },
        **{engine: {"sizes": sizes, "growth": growth(sizes)} for engine, sizes in results.items()},
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    if result["simulation"]["sizes"]:
        result["plan"] = plan(result)
    out = Console(width=200)
    for engine in ("simulation", "deployment"):
        if result[engine]["sizes"]:
            sizes = result[engine]["sizes"]
            out.print(time_table(f"{engine}: median round (seconds)", sizes))
            out.print(coordinator_table(f"{engine}: the coordinator per median round", sizes))
        if result[engine]["growth"]:
            out.print(
                growth_table(f"{engine}: growth with the number of sites", result[engine]["growth"])
            )
    if "plan" in result:
        out.print(plan_table(result["plan"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    out.print(f"wrote {args.out}")
    out.print(summary(result))


if __name__ == "__main__":
    main()
