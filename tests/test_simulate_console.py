"""One real ``fedct simulate`` of two tiny sites, as a user runs it: the lines it prints
(counted), the TensorBoard events and Flower record it leaves, and nothing left running."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedct.server.launch.simulate import local_flower_processes, write_run_config

ROOT = Path(__file__).parents[1]
MAX_STDOUT_LINES = 20  # 3 rounds + cross-site + a 7-line table + best/run/next + 4 commands
MAX_STDERR_LINES = 4  # what it simulates, the Flower run id, the processes it stopped


def fedct(*args: object, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "fedct.common.cli", *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_simulate_prints_a_line_per_round_and_keeps_the_rest_for_later(
    run_config: dict[str, Any], tmp_path: Path
) -> None:
    keys = ("backbone", "image-size", "batch-size", "lr", "device", "site-caches")
    overrides = {k: run_config[k] for k in keys} | {"num-server-rounds": 2}
    overrides["transport-dtype"] = "float16"
    overrides["external-caches"] = run_config["external-caches"]
    run_dir = tmp_path / "runs" / "first"
    overrides["run-dir"] = str(run_dir)
    config = write_run_config(tmp_path / "sim.toml", overrides)
    done = fedct("simulate", "--config", config, "--cpus", 2)
    assert done.returncode == 0, done.stdout + done.stderr
    out, err = done.stdout.splitlines(), done.stderr.splitlines()
    print(f"fedct simulate printed {len(out)} stdout and {len(err)} stderr lines")

    assert len(out) <= MAX_STDOUT_LINES and len(err) <= MAX_STDERR_LINES, done.stdout + done.stderr
    assert "\x1b[" not in done.stdout + done.stderr
    for noise in ("ClientAppActor", "DEBUG", "Ray", "INFO"):
        assert noise not in done.stdout + done.stderr
    progress = [line for line in out if re.match(r"round \d/2: ", line)]
    assert [line.split(":")[0] for line in progress] == ["round 0/2", "round 1/2", "round 2/2"]
    assert "2 sites replied" in progress[1] and "ext AUC" in progress[1]
    assert "best so far: round" in progress[2]
    assert any(line.startswith("cross-site validation:") for line in out)
    best = json.loads((run_dir / "best.json").read_text())
    marked = [line for line in out if "◀ best" in line]
    assert len(marked) == 1 and marked[0].split()[1] == str(best["round"])
    assert f"checkpoint {run_dir / best['checkpoint']}" in done.stdout
    evaluation = run_dir / f"eval-round_{best['round']:03d}"
    assert out[-4:] == [
        f"  fedct report {run_dir}",
        f"  fedct evaluate --model {run_dir / best['checkpoint']} --data "
        f"{run_config['external-caches'].split('=')[1]} --out "
        f"{evaluation}",
        f"  tensorboard --logdir {run_dir.parent}",
        f"  fedct flwr {run_dir} log",
    ]

    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2]
    assert set(lines[2]["sites"]) == {"site_a", "site_b"}
    assert lines[0]["central"]["ext-loss"] != lines[-1]["central"]["ext-loss"]
    assert "tune-auc_covid" in lines[1]["federated"]  # a site's CI bounds are not averaged
    assert not any(key.endswith(("_low", "_high")) for key in lines[1]["federated"])

    # Flower's whole stream is in the log; the run id is recorded; the card says what made it.
    log = (run_dir / "flower.log").read_text()
    assert "Starting Flower Simulation" in log and "ClientAppActor" in log
    run_id = json.loads((run_dir / "run_config.json").read_text())["flower_run_id"]
    assert f"Flower run {run_id} started" in done.stderr
    card = json.loads((run_dir / "round_002.card.json").read_text())
    assert card["run"]["flower_run_id"] == run_id
    assert set(card["software"]) >= {"fedct", "torch", "timm", "flwr"}

    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "central/ext/auc_covid",
        "central/ext/loss",
        "federated/tune-auc_covid",
        "train/train-loss",
        "sites/tune-auc_covid/site_a",
        "sites/train-loss/site_b",
        "participation/sites",
        "transport/download-bytes",
        "best/tune-auc_covid",
    } <= tags, tags
    assert [e.step for e in events.Scalars("central/ext/auc_covid")] == [0, 1, 2]

    home = run_dir / "flower"
    assert not local_flower_processes(home), "fedct simulate left Flower processes running"
    listed = fedct("flwr", run_dir, "ls", timeout=120)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert str(run_id) in listed.stdout
    assert not local_flower_processes(home), "fedct flwr left its SuperLink running"
