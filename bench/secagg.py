"""What secure aggregation costs, and what robust aggregation buys: one JSON, both sides of
every ratio.

1. **Round time and bytes through the coordinator, with and without secure aggregation**, in
   Flower's simulation engine: ``--sites`` (3, 10, 30) simulated sites of timm's
   ``test_efficientnet`` on tiny synthetic caches (bench/fl_scale.py's), and the demo's model
   (configs/demo.toml: ImageNet EfficientNet-Lite0 at 128², three hospitals).  Each size runs
   the same rounds with ``secure-aggregation`` false and true (``cross-site`` off in both: it
   needs single sites' models), ``--repeats`` (demo: ``--demo-repeats``) times each, in the
   order plain, secure, secure, plain, … so that a load drifting during the benchmark weighs
   on both.  Round 1 also starts Ray, so a mode's round time is the median of its rounds ≥ 2;
   bytes are the content of every message the coordinator sent and received in a round
   (``coordinator-bytes-sent`` / ``-received`` of metrics.jsonl).  The central evaluation
   is the same work in both modes, so its seconds show how loaded the machine was during
   each; the secure runs' cards also give the protocol's own seconds (the keys, shares and
   unmask stages, and the masked train stage beyond the sites' training).  **Target: the
   demo's round at most 1.5 × the plain round's time.**  The demo's external AUCs with and
   without secure aggregation are compared round by round (they should agree within 0.005).
2. **Poisoning** (``--poisoning``): the demo's three hospitals train one round from the demo's
   initial model (client/local.py's ``train_site``, as in a round); FedAvg, FedMedian, the
   trimmed mean, Krum and MultiKrum aggregate the replies (server/strategies.py) as they are
   and with the third site's update scaled by -10; each aggregate is scored on the external
   set.  A model whose outputs are not finite scores 0.5.

    python -m bench.secagg [--sites 3,10,30] [--rounds 3] [--repeats 1] [--demo-repeats 2]
                           [--no-demo] [--poisoning] [--cpus 2] [--config configs/demo.toml]

Writes bench/results/secagg.json and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from flwr.app import Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from rich.console import Console
from rich.table import Table

from bench.fl_scale import TINY_RUN, write_caches
from bench.harness import (
    BENCH_ERRORS,
    RESULTS,
    RUNS,
    BenchError,
    DemoRun,
    add_demo_arguments,
    external_aucs,
    fmt,
    machine,
    prepare_demo,
    ratio,
    simulate_fresh,
)
from fedct.client.local import train_site
from fedct.client.site_data import resolve_site
from fedct.common.cache.dataset import CacheDataset
from fedct.common.federation.messages import TrainInstruction
from fedct.common.federation.transport import Layout, conform, dtypes_of, to_record
from fedct.common.run.directory import RunDirectory
from fedct.common.training.loop import score_split
from fedct.server.global_model import GlobalModel
from fedct.server.launch.simulate import Resources, resolve_paths
from fedct.server.settings import ServerSettings, app_defaults
from fedct.server.strategies import ROBUST_STRATEGIES, build_strategy

WORK = RUNS / "secagg"
TARGET = 1.5
POISON_SCALE = -10.0
MODES = {"plain": False, "secure": True}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def run_figures(run: RunDirectory, wall: float, load: tuple[float, float]) -> dict[str, Any]:
    """A run's per-round figures and their medians over rounds ≥ 2; ``load`` is the 1-minute
    load average before and after it."""
    rows = []
    for line in run.metrics()[1:]:
        card = run.read_json(run.card_path(line["round"]).name) or {}
        sections = {
            "train": card.get("train", {}),
            "evaluate": card.get("federated_evaluation", {}),
        }
        stages = {
            phase: {
                name: stage["seconds"]
                for name, stage in (
                    (section.get("secure_aggregation") or {}).get("stages") or {}
                ).items()
            }
            for phase, section in sections.items()
        }
        train_seconds = line.get("train", {}).get("train-seconds")
        short = sum(
            seconds
            for phase in stages.values()
            for name, seconds in phase.items()
            if name != "masked"
        )
        masked = stages["train"].get("masked")
        rows.append(
            {
                "round": line["round"],
                "sites": len(line.get("sites") or {}),
                "failures": line.get("failures", 0),
                "seconds": line["seconds"],
                "train_phase_seconds": line.get("train-phase-seconds"),
                "evaluate_phase_seconds": line.get("evaluate-phase-seconds"),
                # The same work in both modes: how loaded the machine was.
                "central_seconds": line.get("central-seconds"),
                "mean_site_train_seconds": train_seconds,
                "bytes_sent": line.get("coordinator-bytes-sent"),
                "bytes_received": line.get("coordinator-bytes-received"),
                "stage_seconds": stages,
                # Secure runs: the keys, shares and unmask stages of both phases, and the
                # masked train stage beyond the sites' mean training.
                "short_stage_seconds": short if masked is not None else None,
                "masked_beyond_training_seconds": (
                    masked - train_seconds if masked is not None and train_seconds else None
                ),
                "external_auc": external_aucs(line.get("central", {})),
            }
        )
    return {
        "wall_seconds": round(wall, 1),
        "load_average": list(load),
        "run_dir": str(run.path),
        "rounds": rows,
    }


MEDIANS = (
    "seconds",
    "train_phase_seconds",
    "evaluate_phase_seconds",
    "central_seconds",
    "mean_site_train_seconds",
    "bytes_sent",
    "bytes_received",
    "short_stage_seconds",
    "masked_beyond_training_seconds",
)


def medians(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    """The medians over every run's rounds ≥ 2 (round 1 also starts Ray)."""
    steady = [r for run in runs for r in run["rounds"] if r["round"] >= 2]
    steady = steady or [r for run in runs for r in run["rounds"]]
    return {k: _median([r[k] for r in steady if r[k] is not None]) for k in MEDIANS}


def auc_differences(first: dict[str, Any], second: dict[str, Any]) -> dict[int, float]:
    """Round → the largest difference of an external AUC between two runs."""
    out = {}
    for a, b in zip(first["rounds"], second["rounds"], strict=False):
        pairs = [
            abs(value - other)
            for name, value in a["external_auc"].items()
            if value is not None and (other := b["external_auc"].get(name)) is not None
        ]
        if pairs:
            out[a["round"]] = max(pairs)
    return out


def compare(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Secure against plain: the ratios of the medians, both sides kept, and the largest
    difference of an external AUC per round, between runs paired by repeat and, as the
    control, between repeats of one mode (a secure run's stochastic rounding draws from the
    system, so two secure runs differ in the last bits like a secure and a plain one)."""
    plain, secure = runs["plain"]["median"], runs["secure"]["median"]
    pairs = zip(runs["plain"]["runs"], runs["secure"]["runs"], strict=True)
    by_round: dict[int, float] = {}
    for p_run, s_run in pairs:
        for r, difference in auc_differences(p_run, s_run).items():
            by_round[r] = max(by_round.get(r, 0.0), difference)
    spread = {
        mode: auc_differences(runs[mode]["runs"][0], runs[mode]["runs"][1])
        for mode in MODES
        if len(runs[mode]["runs"]) > 1
    }
    return {
        "round_seconds": {"plain": plain["seconds"], "secure": secure["seconds"]},
        "round_ratio": ratio(secure["seconds"], plain["seconds"]),
        "central_seconds": {"plain": plain["central_seconds"], "secure": secure["central_seconds"]},
        "bytes_sent": {"plain": plain["bytes_sent"], "secure": secure["bytes_sent"]},
        "bytes_sent_ratio": ratio(secure["bytes_sent"], plain["bytes_sent"]),
        "bytes_received": {"plain": plain["bytes_received"], "secure": secure["bytes_received"]},
        "bytes_received_ratio": ratio(secure["bytes_received"], plain["bytes_received"]),
        "max_external_auc_difference": max(by_round.values()) if by_round else None,
        "external_auc_difference_by_round": by_round,
        "same_mode_external_auc_difference_by_round": spread,
    }


def simulate_once_more(
    demo: DemoRun, run_dir: Path, changes: dict[str, Any], console: Console
) -> tuple[RunDirectory, float, str | None]:
    """:func:`simulate_fresh`, tried a second time when the first did not finish (on a
    loaded machine Flower's local SuperLink may miss its 15 s to start); the first failure
    is returned with the run, for the JSON."""
    try:
        return (*simulate_fresh(demo, run_dir, **changes), None)
    except BenchError as first:
        console.print(f"[yellow]{first}; trying once more[/]", highlight=False)
        return (*simulate_fresh(demo, run_dir, **changes), str(first))


def both(
    demo: DemoRun, name: str, changes: dict[str, Any], repeats: int, console: Console
) -> dict[str, Any]:
    """The plain and the secure runs of one size, ``repeats`` of each in the order plain,
    secure, secure, plain, … (a load that drifts during the benchmark weighs on both)."""
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for repeat in range(repeats):
        order = list(MODES) if repeat % 2 == 0 else list(reversed(MODES))
        for mode in order:
            console.print(f"[bold]{name}[/]: {mode} run {repeat + 1} …", highlight=False)
            before = os.getloadavg()[0]
            run, wall, retried = simulate_once_more(
                demo,
                WORK / f"{name}-{mode}-{repeat + 1}",
                {**changes, "secure-aggregation": MODES[mode]},
                console,
            )
            figures = run_figures(run, wall, (before, os.getloadavg()[0]))
            figures["retried_after"] = retried
            if any(r["sites"] == 0 for r in figures["rounds"]):
                raise BenchError(f"{name} {mode}: a round without a site")
            runs[mode].append(figures)
    out = {mode: {"runs": done, "median": medians(done)} for mode, done in runs.items()}
    return {**out, "comparison": compare(out)}


def tiny_size(sites: int, rounds: int, cpus: int, repeats: int, console: Console) -> dict[str, Any]:
    caches, external = write_caches(WORK / "caches", sites)
    overrides = {
        **TINY_RUN,
        "num-server-rounds": rounds,
        "site-caches": ",".join(str(c) for c in caches),
        "external-caches": f"ext={external}",
        "min-available-nodes": sites,
        "min-train-nodes": sites,
        "min-train-replies": sites,
    }
    demo = DemoRun(resolve_paths(overrides), Resources(client_cpus=1, cpus=cpus))
    return {"sites": sites, **both(demo, f"tiny-{sites}", {}, repeats, console)}


def demo_size(
    config: Path, assignments: list[str], repeats: int, console: Console
) -> dict[str, Any]:
    demo = prepare_demo(config, assignments)
    sites = len(str(demo.overrides["site-caches"]).split(","))
    changes = {"cross-site": False, "min-train-nodes": sites, "min-available-nodes": sites}
    return {"sites": sites, **both(demo, "demo", changes, repeats, console)}


def poisoning(config: Path, assignments: list[str], console: Console) -> dict[str, Any]:
    """One round of the demo's hospitals, one poisoned; each strategy's external AUC."""
    demo = prepare_demo(config, assignments)
    run_config = {**app_defaults(), **demo.overrides}
    settings = ServerSettings.from_run_config(run_config)
    model = GlobalModel(settings.model, settings.seed)
    start = {k: a.numpy() for k, a in model.arrays().items()}
    layout = Layout.of(start)
    instruction = TrainInstruction.from_record(
        settings.train_instruction("bench", 1, layout.fingerprint)
    )
    packed = layout.pack(start, "float32")
    trained = []
    for cache in str(run_config["site-caches"]).split(","):
        site = resolve_site({"data-path": cache, "device": str(settings.device)}, run_config)
        console.print(f"poisoning: {site.name} trains one round …", highlight=False)
        arrays, metrics = train_site(site, instruction, packed)
        trained.append((layout.unpack(arrays), metrics))
    external_name, external = next(iter(settings.external_caches.items()))
    dataset = CacheDataset(external)
    dtypes = dtypes_of(to_record(start))
    # Building a Message outside a running Flower process needs a task identity.
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 1, 1  # type: ignore[attr-defined]

    def score(name: str, poisoned: bool) -> float:
        replies = []
        for i, (state, metrics) in enumerate(trained):
            if poisoned and i == len(trained) - 1:
                state = {
                    k: start[k] + POISON_SCALE * (v - start[k]) if v.dtype.kind == "f" else v
                    for k, v in state.items()
                }
            content = RecordDict({"arrays": to_record(state), "metrics": metrics})
            replies.append(Message(content, dst_node_id=10 + i, message_type=MessageType.TRAIN))
        strategy = build_strategy(
            name,
            fraction_train=1.0,
            min_train_nodes=len(trained),
            min_available_nodes=len(trained),
            proximal_mu=0.0,
            server_lr=settings.server_lr,
            client_lr=settings.training.lr,
            statistics_keys=model.statistics_keys(),
            malicious_sites=1,
        )
        arrays, _ = strategy.aggregate_train(1, replies)
        model.load_arrays(conform(arrays, dtypes))
        try:
            scores, _ = score_split(
                model.model, dataset, "ext", batch_size=settings.training.batch_size,
                device=settings.device,
            )  # fmt: skip
        except ValueError:  # outputs that are not finite rank nothing
            auc = 0.5
        else:
            auc = scores["ext-auc_covid"]
        console.print(f"poisoning: {name}{' (poisoned)' if poisoned else ''}: AUC {auc:.3f}")
        return auc

    names = ("fedavg", *ROBUST_STRATEGIES)
    clean = {name: score(name, poisoned=False) for name in names}
    poisoned = {name: score(name, poisoned=True) for name in names}
    return {
        "external_set": external_name,
        "scale": POISON_SCALE,
        "clean_auc": clean,
        "poisoned_auc": poisoned,
        # Each strategy against its own clean run, and against the clean FedAvg run.
        "poisoned_within_0.02_of_own_clean": {
            k: abs(v - clean[k]) <= 0.02 for k, v in poisoned.items()
        },
        "poisoned_within_0.02_of_clean_fedavg": {
            k: abs(v - clean["fedavg"]) <= 0.02 for k, v in poisoned.items()
        },
    }


def size_table(sizes: list[dict[str, Any]]) -> Table:
    table = Table(title="secure aggregation against plain FedAvg (median round ≥ 2)")
    for column in ("run", "sites", "plain s", "secure s", "ratio", "central s plain/secure",
                   "sent MB plain/secure", "received MB plain/secure", "max ΔAUC"):  # fmt: skip
        table.add_column(column, justify="right")
    for size in sizes:
        c = size["comparison"]
        mb = 1e-6
        table.add_row(
            size["name"],
            str(size["sites"]),
            fmt(c["round_seconds"]["plain"], ".1f"),
            fmt(c["round_seconds"]["secure"], ".1f"),
            fmt(c["round_ratio"], ".2f"),
            f"{fmt(c['central_seconds']['plain'], '.1f')} / "
            f"{fmt(c['central_seconds']['secure'], '.1f')}",
            f"{fmt((c['bytes_sent']['plain'] or 0) * mb, '.2f')} / "
            f"{fmt((c['bytes_sent']['secure'] or 0) * mb, '.2f')}",
            f"{fmt((c['bytes_received']['plain'] or 0) * mb, '.2f')} / "
            f"{fmt((c['bytes_received']['secure'] or 0) * mb, '.2f')}",
            fmt(c["max_external_auc_difference"], ".4f"),
        )
    return table


def _sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_demo_arguments(parser, RESULTS / "secagg.json")
    parser.add_argument("--sites", type=_sizes, default=[3, 10, 30])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of each mode per tiny size (ABBA order)"
    )
    parser.add_argument(
        "--demo-repeats", type=int, default=2, help="runs of each mode of the demo (ABBA order)"
    )
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-demo", action="store_true", help="skip the demo's model")
    parser.add_argument("--poisoning", action="store_true", help="also the poisoning scenario")
    args = parser.parse_args()
    console = Console(stderr=True)
    began = time.perf_counter()
    result: dict[str, Any] = {"machine": machine(), "load_average_start": os.getloadavg()}
    result["sizes"] = sizes = []

    def save() -> None:  # after every part: a later failure keeps what was measured
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))

    try:
        for n in args.sites:
            sizes.append(
                {"name": f"tiny-{n}", **tiny_size(n, args.rounds, args.cpus, args.repeats, console)}
            )
            save()
        if not args.no_demo:
            demo_figures = demo_size(args.config, args.set, args.demo_repeats, console)
            sizes.append({"name": "demo", **demo_figures})
            save()
        if args.poisoning:
            result["poisoning"] = poisoning(args.config, args.set, console)
    except BENCH_ERRORS as exc:
        raise SystemExit(f"bench.secagg: {exc} (figures so far in {args.out})") from None
    demo = next((s for s in result["sizes"] if s["name"] == "demo"), None)
    result["target"] = {
        "demo_round_ratio_at_most": TARGET,
        "demo_round_ratio": demo["comparison"]["round_ratio"] if demo else None,
        "met": bool(demo and (demo["comparison"]["round_ratio"] or 99) <= TARGET),
    }
    result["load_average_end"] = os.getloadavg()
    result["wall_seconds"] = round(time.perf_counter() - began, 1)
    save()
    Console().print(size_table(result["sizes"]))
    if "poisoning" in result:
        Console().print(json.dumps(result["poisoning"], indent=2))
    print(
        f"demo round: secure/plain = {fmt(result['target']['demo_round_ratio'], '.2f')} "
        f"(target ≤ {TARGET}); written {args.out}"
    )


if __name__ == "__main__":
    main()
