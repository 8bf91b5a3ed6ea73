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
    run.lock                         the coordinator writing here (server/run_lock.py)

Every file is written to a temporary name, forced to disk and renamed; a metrics line is
appended and forced to disk before ``best.json`` and ``latest.json`` move.  A crash at any
point of a round's bookkeeping leaves at worst files of a round after ``latest.json``, which
:meth:`RunDirectory.recover` drops on resume (a torn last metrics line included).  Non-finite
metric values are written as ``null`` so that the JSON stays standard.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load, save

from fedct.common.cache.store import atomic_open
from fedct.common.classes import GLOBAL_CLASSES


class CheckpointError(RuntimeError):
    """A run directory cannot be resumed from."""


@dataclass(frozen=True)
class Checkpoint:
    round: int
    arrays: dict[str, np.ndarray]
    strategy_state: dict[str, np.ndarray]


CARD_SUFFIX = ".card.json"
WEIGHTS_SUFFIX = ".safetensors"
ROUND_CARD = re.compile(r"round_([0-9]{1,9})" + re.escape(CARD_SUFFIX))  # a round's card name


def _stem(server_round: int) -> str:
    return f"round_{server_round:03d}"


def jsonable(value: Any) -> Any:
    """``value`` with numpy arrays as lists, numpy scalars as Python numbers and NaN/inf as
    None, so that ``json.dumps(..., allow_nan=False)`` accepts it."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class CheckpointLoadError(ValueError):
    """A checkpoint or model card is missing, unreadable, or the two do not belong together."""


def verified_sha256(blob: bytes, card: dict[str, Any], weights: Path, card_path: Path) -> str:
    """The sha256 of the weights file ``blob``, which must be the one its model card records
    (every card fedct writes records it); CheckpointLoadError otherwise."""
    digest = hashlib.sha256(blob).hexdigest()
    expected = card.get("sha256")
    if not expected:
        raise CheckpointLoadError(f"{card_path}: model card has no sha256; cannot verify weights")
    if digest != expected:
        raise CheckpointLoadError(
            f"{weights}: sha256 differs from its model card {card_path.name} (the file's is "
            f"{digest}, the card's {expected}); the weights were changed or belong to another "
            "card"
        )
    return digest


def round_record(
    *,
    strategy: str,
    model_config: dict[str, Any],
    run_config: dict[str, Any],
    train: dict[str, Any],
    train_metrics: dict[str, Any],
    federated: dict[str, Any],
    central: dict[str, Any],
    seconds: float,
    sites: dict[str, int],
    card: dict[str, Any] | None = None,
    line: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model card and the metrics line of a round, as every writer of a run directory
    records them: the card holds what ``train`` reports, the line its ``train_metrics``;
    ``card`` and ``line`` add a writer's own keys."""
    created = datetime.now(UTC).isoformat(timespec="seconds")
    model_card = {
        "created": created,
        "strategy": strategy,
        "classes": list(GLOBAL_CLASSES),
        "model_config": model_config,
        "run_config": run_config,
        "train": train,
        "central_evaluation": central,
        **(card or {}),
    }
    metrics_line = {
        "time": created,
        "seconds": round(seconds, 3),
        "sites": sites,
        **(line or {}),
        "train": train_metrics,
        "federated": federated,
        "central": central,
    }
    return model_card, metrics_line


def best_value(line: dict[str, Any], metric: str) -> float | None:
    """A round's value of ``metric``: the federated evaluation's, else the central one's."""
    return line.get("federated", {}).get(metric, line.get("central", {}).get(metric))


class RunDirectory:
    """Reads and writes one run directory (see the module docstring for its layout).

    ``guard`` is called before every write (the coordinator's :meth:`RunLock.check`).
    """

    def __init__(self, path: Path, guard: Callable[[], None] | None = None) -> None:
        self.path = Path(path)
        self.guard = guard

    def _writing(self) -> None:
        if self.guard is not None:
            self.guard()

    def weights_path(self, server_round: int) -> Path:
        return self.path / f"{_stem(server_round)}{WEIGHTS_SUFFIX}"

    def card_path(self, server_round: int) -> Path:
        return self.path / f"{_stem(server_round)}{CARD_SUFFIX}"

    def strategy_path(self, server_round: int) -> Path:
        return self.path / f"{_stem(server_round)}.strategy{WEIGHTS_SUFFIX}"

    def write_json(self, name: str, content: dict[str, Any]) -> None:
        self._writing()
        with atomic_open(self.path / name, durable=True) as handle:
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

    def _write_bytes(self, path: Path, blob: bytes) -> None:
        self._writing()
        with atomic_open(path, "wb", durable=True) as handle:
            handle.write(blob)

    def save_round(
        self,
        server_round: int,
        arrays: dict[str, np.ndarray],
        card: dict[str, Any],
        metrics: dict[str, Any],
        strategy_state: dict[str, np.ndarray],
        best_metric: str | None = None,
    ) -> str:
        """Write the round's weights, card, optimiser state and metrics line, then move
        ``best`` (by ``best_metric``, when given) and last ``latest``.

        Returns the sha256 of the weights file, which the card records.
        """
        blob = save({k: np.asarray(v, order="C") for k, v in arrays.items()})
        digest = hashlib.sha256(blob).hexdigest()
        self._write_bytes(self.weights_path(server_round), blob)
        checkpoint = self.weights_path(server_round).name
        self.write_json(
            self.card_path(server_round).name,
            {**card, "round": server_round, "checkpoint": checkpoint, "sha256": digest},
        )
        if strategy_state:
            self._write_bytes(self.strategy_path(server_round), save(strategy_state))
        line = {"round": server_round, **metrics}
        self.truncate_metrics(server_round - 1)
        self._writing()
        with open(self.path / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(jsonable(line)) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if best_metric is not None:
            self.update_best(server_round, best_metric, best_value(line, best_metric))
        self._point_latest(server_round)
        return digest

    def latest_card(self) -> dict[str, Any]:
        """The card of the round ``latest.json`` names; empty when there is none."""
        latest = self.read_json("latest.json") or {}
        if "round" not in latest:
            return {}
        return self.read_json(self.card_path(int(latest["round"])).name) or {}

    def _point_latest(self, server_round: int) -> None:
        checkpoint = self.weights_path(server_round).name
        self.write_json("latest.json", {"round": server_round, "checkpoint": checkpoint})

    def _metric_lines(self) -> tuple[list[dict[str, Any]], bool]:
        """The parsed metrics lines, and whether a torn last line was left out.  A damaged
        line elsewhere is a :class:`CheckpointError` naming it."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return [], False
        text = path.read_text(errors="replace")
        lines = text.splitlines()
        parsed = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                parsed.append(json.loads(line))
            except json.JSONDecodeError as exc:
                if number == len(lines) and not text.endswith("\n"):
                    return parsed, True
                raise CheckpointError(f"{path}: line {number} is not JSON ({exc})") from exc
        return parsed, False

    def metrics(self) -> list[dict[str, Any]]:
        """One dict per round (a torn last line, being written or cut by a crash, left out)."""
        return self._metric_lines()[0]

    def _rewrite_metrics(self, lines: list[dict[str, Any]]) -> None:
        self._writing()
        with atomic_open(self.path / "metrics.jsonl", durable=True) as handle:
            handle.writelines(json.dumps(line) + "\n" for line in lines)

    def truncate_metrics(self, last_round: int) -> None:
        """Drop metrics lines of rounds after ``last_round`` (left by an interrupted round)."""
        lines, torn = self._metric_lines()
        kept = [line for line in lines if line["round"] <= last_round]
        if torn or len(kept) != len(lines):
            self._rewrite_metrics(kept)

    def recover(self, best_metric: str) -> list[str]:
        """Make the directory resumable after a crash at any point of a round's bookkeeping;
        returns what was repaired (one warning each).

        Drops a torn last metrics line, metrics lines of rounds after ``latest.json`` and
        temporary files; keeps one line per round; steps ``latest.json`` back to the last
        round that has its metrics line; and points ``best.json`` at the best of the rounds
        that remain when it named a dropped round.
        """
        notes: list[str] = []
        for tmp in self.path.glob(".*.tmp"):
            self._writing()
            tmp.unlink(missing_ok=True)
        latest = self.read_json("latest.json")
        if latest is None:
            raise CheckpointError(f"{self.path}: no latest.json; nothing to resume from")
        last = int(latest["round"])
        lines, torn = self._metric_lines()
        metrics_path = self.path / "metrics.jsonl"
        if torn:
            notes.append(
                f"{metrics_path}: its last line was cut short (a crash while it was written); "
                "dropped it"
            )
        by_round = {int(line["round"]): line for line in lines if int(line["round"]) <= last}
        dropped = sorted({int(line["round"]) for line in lines} - set(by_round))
        if dropped:
            notes.append(
                f"{metrics_path}: dropped the lines of round(s) {dropped}, after the last "
                f"complete round {last}"
            )
        complete = [r for r in sorted(by_round) if self.weights_path(r).is_file()]
        if last not in complete:
            if not complete:
                raise CheckpointError(f"{metrics_path}: no round has both metrics and weights")
            notes.append(
                f"{metrics_path}: round {last} has no metrics line; resuming after round "
                f"{complete[-1]} instead"
            )
            last = complete[-1]
        kept = [by_round[r] for r in sorted(by_round) if r <= last]
        if torn or len(kept) != len(lines):
            self._rewrite_metrics(kept)
        if last != int(latest["round"]):
            self.write_json(
                "latest.json", {"round": last, "checkpoint": self.weights_path(last).name}
            )
        best = self.read_json("best.json")
        if best is not None and int(best.get("round", -1)) > last:
            (self.path / "best.json").unlink()
            for line in kept:
                self.update_best(int(line["round"]), best_metric, best_value(line, best_metric))
            notes.append(f"{self.path / 'best.json'}: named a dropped round; chosen again")
        return notes

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
        try:
            verified_sha256(blob, card, path, self.card_path(server_round))
        except CheckpointLoadError as exc:
            raise CheckpointError(str(exc)) from exc
        state_path = self.strategy_path(server_round)
        state = load(state_path.read_bytes()) if state_path.exists() else {}
        return Checkpoint(server_round, load(blob), state)
