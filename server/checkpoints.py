"""The run directory: a checkpoint and a model card per round, metrics, and pointers.

Layout::

    run_config.json                  the run key, and the run config of the run that last
                                     wrote here with the round it started from
    round_NNN.safetensors            global weights after round NNN (000: the initial model)
    round_NNN.card.json              model card of that checkpoint (sha256 of the weights file)
    round_NNN.strategy.safetensors   server optimiser state (FedAdam moments), when there is any
    metrics.jsonl                    one JSON object per round
    best.json                        the round with the best value of the configured metric
    latest.json                      the last complete round; written last, so a crash at any
                                     point leaves it naming a checkpoint that is whole

Every file is written to a temporary name and renamed.  Non-finite metric values are
written as ``null`` so that the JSON stays standard.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load, save

from common.cache import atomic_open
from common.checkpoint_io import jsonable


class CheckpointError(RuntimeError):
    """A run directory cannot be resumed from."""


@dataclass(frozen=True)
class Checkpoint:
    round: int
    arrays: dict[str, np.ndarray]
    strategy_state: dict[str, np.ndarray]


def _stem(server_round: int) -> str:
    return f"round_{server_round:03d}"


class RunDirectory:
    """Reads and writes one run directory (see the module docstring for its layout)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def weights_path(self, server_round: int) -> Path:
        return self.path / f"{_stem(server_round)}.safetensors"

    def card_path(self, server_round: int) -> Path:
        return self.path / f"{_stem(server_round)}.card.json"

    def strategy_path(self, server_round: int) -> Path:
        return self.path / f"{_stem(server_round)}.strategy.safetensors"

    def write_json(self, name: str, content: dict[str, Any]) -> None:
        with atomic_open(self.path / name) as handle:
            json.dump(jsonable(content), handle, indent=2, sort_keys=True)
            handle.write("\n")

    def read_json(self, name: str) -> dict[str, Any] | None:
        path = self.path / name
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: unreadable ({exc})") from exc

    def claim(self) -> str:
        """Take this directory for a new run and return the run's key (random, kept across
        resumes, naming the sites' run state).  A directory that holds a run is refused."""
        if (self.path / "latest.json").exists():
            raise CheckpointError(
                f"{self.path} already holds a run: set resume-from to continue it, "
                "or choose another run-dir"
            )
        return uuid.uuid4().hex[:16]

    def run_key(self) -> str:
        """The key :meth:`claim` gave the run in this directory."""
        recorded = self.read_json("run_config.json") or {}
        if "run_key" not in recorded:
            raise CheckpointError(f"{self.path}: run_config.json lacks the run key")
        return str(recorded["run_key"])

    def save_round(
        self,
        server_round: int,
        arrays: dict[str, np.ndarray],
        card: dict[str, Any],
        metrics: dict[str, Any],
        strategy_state: dict[str, np.ndarray],
    ) -> str:
        """Write the round's weights, card, optimiser state and metrics line; move ``latest``.

        Returns the sha256 of the weights file, which the card records.
        """
        blob = save({k: np.asarray(v, order="C") for k, v in arrays.items()})
        digest = hashlib.sha256(blob).hexdigest()
        with atomic_open(self.weights_path(server_round), "wb") as handle:
            handle.write(blob)
        checkpoint = self.weights_path(server_round).name
        self.write_json(
            self.card_path(server_round).name,
            {**card, "round": server_round, "checkpoint": checkpoint, "sha256": digest},
        )
        if strategy_state:
            with atomic_open(self.strategy_path(server_round), "wb") as handle:
                handle.write(save(strategy_state))
        self.truncate_metrics(server_round - 1)
        with open(self.path / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(jsonable({"round": server_round, **metrics})) + "\n")
        self.write_json("latest.json", {"round": server_round, "checkpoint": checkpoint})
        return digest

    def metrics(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, last_round: int) -> None:
        """Drop metrics lines of rounds after ``last_round`` (left by an interrupted round)."""
        lines = self.metrics()
        kept = [line for line in lines if line["round"] <= last_round]
        if len(kept) != len(lines):
            with atomic_open(self.path / "metrics.jsonl") as handle:
                handle.writelines(json.dumps(line) + "\n" for line in kept)

    def update_best(self, server_round: int, metric: str, value: float | None) -> bool:
        """Point ``best.json`` at this round when ``value`` beats the best so far.

        Metrics whose name ends in ``loss`` are minimised, all others maximised.  Missing or
        non-finite values never become best.
        """
        if value is None or not math.isfinite(value):
            return False
        best = self.read_json("best.json")
        if best is not None and best.get("metric") == metric and best.get("value") is not None:
            better = value < best["value"] if metric.endswith("loss") else value > best["value"]
            if not better:
                return False
        self.write_json(
            "best.json",
            {
                "round": server_round,
                "metric": metric,
                "value": value,
                "checkpoint": self.weights_path(server_round).name,
            },
        )
        return True

    def load_latest(self) -> Checkpoint:
        """The last complete round's weights and optimiser state."""
        latest = self.read_json("latest.json")
        if latest is None:
            raise CheckpointError(f"{self.path}: no latest.json; nothing to resume from")
        server_round = int(latest["round"])
        path = self.weights_path(server_round)
        card = self.read_json(self.card_path(server_round).name) or {}
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read checkpoint ({exc})") from exc
        if card.get("sha256") not in (None, hashlib.sha256(blob).hexdigest()):
            raise CheckpointError(f"{path}: sha256 differs from its model card")
        state_path = self.strategy_path(server_round)
        state = load(state_path.read_bytes()) if state_path.exists() else {}
        return Checkpoint(server_round, load(blob), state)
