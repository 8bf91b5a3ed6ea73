"""What a dead ClientApp behind a live SuperNode costs a round: with the straggler deadline,
and (``--without-deadline T``) without it.

Starts Flower's deployment engine on 127.0.0.1 (tests/deployment.py): a plaintext SuperLink
with its SuperExec and three hospitals, each a SuperNode with its own SuperExec and a tiny
synthetic cache, training timm's ``test_efficientnet``.  One run of ``--normal`` + ``--dead``
rounds (straggler-factor 2, round-timeout 3600 s, min-train-replies 2): once round
``--normal`` is checkpointed, hospital-c's SuperExec is killed — its SuperNode stays online,
so its messages are taken and never answered.  Every round's wall time (``seconds`` in
metrics.jsonl: waiting for nodes, train phase, federated evaluation, central evaluation,
checkpoint) and its train phase are read from the run directory.

The normal round is the median of rounds 2..``--normal`` (round 1 also waits for round 0's
central evaluation to end on the sites' side); the dead round the median of the rounds whose
card lists hospital-c as failed.  Target: dead ≤ 3 × normal.  ``--without-deadline T`` adds a
second run of one round with hospital-c dead from the start, straggler-factor 0 and
round-timeout T: how fedct behaved before, with Flower waiting the full timeout in each phase.
Prints a table and writes bench/results/straggler.json.

    python -m bench.straggler [--normal 3] [--dead 3] [--without-deadline 60]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tests.conftest import write_tiny_cache
from tests.deploy_procs import Processes
from tests.plaintext_federation import PlaintextFederation

RESULTS = Path(__file__).parent / "results"
SITES = ("hospital-a", "hospital-b", "hospital-c")
DEAD = "hospital-c"
TARGET = 3.0
RUN = {"min-available-nodes": 3, "min-train-nodes": 3, "min-train-replies": 2}


def _lines(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _finish(federation: PlaintextFederation, run_id: int, name: str, rounds: int) -> None:
    status = federation.finished(run_id, name, rounds, 3600)["status"]
    if status != "finished:completed":
        raise SystemExit(f"run {run_id} ended {status}:\n{federation.log(run_id)[-3000:]}")


def measure(normal: int, dead: int, without_deadline: float | None) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="fedct-straggler-"))
    processes = Processes(root)
    train = {"train": {0: 3, 1: 2, 2: 3}, "tune": {0: 1, 2: 1}, "test": {0: 1, 2: 1}}
    caches = {
        site: write_tiny_cache(root / "caches" / site, train, seed=i)
        for i, site in enumerate(SITES)
    }
    external = write_tiny_cache(root / "caches" / "external", {"test": {0: 4, 2: 4}}, seed=9)
    try:
        federation = PlaintextFederation.launch(root, processes, caches, external)
        run_dir = federation.run_dir("deadline")
        keys = {**RUN, "num-server-rounds": normal + dead, "straggler-factor": 2.0}
        run = federation.submit("deadline", **keys, **{"round-timeout": 3600.0})
        federation.reached("deadline", normal, 600)
        federation.kill(f"superexec-{DEAD}")
        _finish(federation, run, "deadline", normal + dead)
        rounds = _rounds(run_dir)
        before = None
        if without_deadline is not None:
            keys = {**RUN, "num-server-rounds": 1, "straggler-factor": 0.0}
            run = federation.submit("no-deadline", **keys, **{"round-timeout": without_deadline})
            _finish(federation, run, "no-deadline", 1)
            before = {
                "round-timeout": without_deadline,
                "rounds": _rounds(federation.run_dir("no-deadline")),
            }
    finally:
        processes.stop_all()
    normal_rounds = [r for r in rounds if 2 <= r["round"] <= normal]
    dead_rounds = [r for r in rounds if DEAD in r["failed_sites"]]
    normal_s = statistics.median(r["seconds"] for r in normal_rounds)
    dead_s = statistics.median(r["seconds"] for r in dead_rounds)
    return {
        "normal_round_seconds": normal_s,
        "dead_clientapp_round_seconds": dead_s,
        "ratio": dead_s / normal_s,
        "target": f"dead ≤ {TARGET:g} × normal",
        "met": dead_s <= TARGET * normal_s,
        "rounds": rounds,
        "without_deadline": before,
        "setup": {
            "sites": list(SITES),
            "dead": DEAD,
            "run_config": {**RUN, "straggler-factor": 2.0, "round-timeout": 3600.0},
            "backbone": "test_efficientnet, 32 × 32 slices, 8 training scans per site",
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "load_average": os.getloadavg(),
            "logs": str(root),
        },
    }


def _rounds(run_dir: Path) -> list[dict[str, Any]]:
    """Round ≥ 1 figures of a run directory."""
    out = []
    for line in _lines(run_dir)[1:]:
        card = json.loads((run_dir / f"round_{line['round']:03d}.card.json").read_text())
        out.append(
            {
                "round": line["round"],
                "seconds": line["seconds"],
                "train_phase_seconds": line["train-phase-seconds"],
                "failed_sites": line["failed_sites"],
                "train_reply_seconds": card["train"].get("reply-seconds", {}),
                "reasons": sorted({f["reason"] for f in card["train"]["sites"]["failed"]}),
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--normal", type=int, default=3, help="rounds with every site alive")
    parser.add_argument("--dead", type=int, default=3, help="rounds after hospital-c's dies")
    parser.add_argument(
        "--without-deadline",
        type=float,
        metavar="T",
        help="also time one round without the deadline, with round-timeout T seconds",
    )
    args = parser.parse_args()
    if args.normal < 2 or args.dead < 1:
        parser.error("--normal must be at least 2 and --dead at least 1")
    started = time.monotonic()
    result = measure(args.normal, args.dead, args.without_deadline)
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    table = Table(title="a dead ClientApp behind a live SuperNode (seconds per round)")
    for column in ("round", "round s", "train phase s", "failed", "why"):
        table.add_column(column)
    for r in result["rounds"]:
        why = "; ".join(r["reasons"])
        row = [str(r["round"]), f"{r['seconds']:.1f}", f"{r['train_phase_seconds']:.1f}"]
        table.add_row(*row, ", ".join(r["failed_sites"]) or "–", why)
    console = Console()
    console.print(table)
    console.print(
        f"normal round {result['normal_round_seconds']:.1f} s, dead-ClientApp round "
        f"{result['dead_clientapp_round_seconds']:.1f} s: {result['ratio']:.2f} × "
        f"({result['target']}: {'met' if result['met'] else 'NOT met'})"
    )
    if result["without_deadline"]:
        before = result["without_deadline"]
        seconds = ", ".join(f"{r['seconds']:.1f}" for r in before["rounds"])
        console.print(
            f"without the deadline (round-timeout {before['round-timeout']:g} s): {seconds} s"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "straggler.json").write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {RESULTS / 'straggler.json'}")


if __name__ == "__main__":
    main()
