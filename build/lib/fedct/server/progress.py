"""One line per round for the people watching a run: ``round k/N: ...``.

The ServerApp logs the line after each round is checkpointed (server/app.py adds a
:class:`ProgressLine` to the round loop's observers), so it shows in ``flwr run --stream``,
in ``flwr log RUN_ID`` and in ``fedct simulate``'s console, which shows only these lines of
Flower's stream (server/launch/flower_console.py).  ``fedct train`` prints the same line for its
baselines.  A line holds the round, the sites that replied (and failed), the round's
seconds, the train loss, the sites' pooled tune AUC, the AUC of every external set and the
best round so far; each failed site gets a warning line of its own.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from fedct.common.run.directory import RunDirectory

# The messages fedct simulate shows from Flower's stream (the rest goes to its log file).
PROGRESS = re.compile(r"^(round \d+/\d+: |cross-site validation: )")
AUC_SUFFIX = "-auc_covid"
Emit = Callable[[str], None]


def metric_label(metric: str) -> str:
    """A readable name for a metrics.jsonl key: ``tune-auc_covid`` → ``tune AUC``."""
    if metric.endswith(AUC_SUFFIX):
        return f"{metric.removesuffix(AUC_SUFFIX)} AUC"
    return metric.replace("-", " ").replace("_", " ")


def _number(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return "–"
    return f"{value:.{digits}f}"


def external_sets(line: dict[str, Any]) -> list[str]:
    """The external sets of a metrics line's central evaluation, sorted."""
    central = line.get("central") or {}
    return sorted(key.removesuffix(AUC_SUFFIX) for key in central if key.endswith(AUC_SUFFIX))


def round_line(
    line: dict[str, Any], num_rounds: int, best: dict[str, Any] | None, failed: int
) -> str:
    """The progress line of one metrics.jsonl line; ``best`` is best.json's content."""
    server_round = int(line["round"])
    central = line.get("central") or {}
    externals = ", ".join(
        f"{name} AUC {_number(central.get(name + AUC_SUFFIX))}" for name in external_sets(line)
    )
    if server_round == 0:
        parts = ["initial model"]
    else:
        replied = len(line.get("sites") or {})
        sites = f"{replied} site{'s' if replied != 1 else ''} replied"
        parts = [
            sites + (f", {failed} failed" if failed else ""),
            f"{line.get('seconds', 0):.1f} s",
            f"train loss {_number((line.get('train') or {}).get('train-loss'))}",
            f"tune AUC {_number((line.get('federated') or {}).get('tune-auc_covid'))}",
        ]
    if externals:
        parts.append(externals)
    text = f"round {server_round}/{num_rounds}: " + ", ".join(parts)
    if line.get("kept_previous_model"):
        text += f"; kept the previous model ({line['kept_previous_model']})"
    if best and best.get("round") is not None:
        value = best.get("value")
        text += (
            f"; best so far: round {best['round']} "
            f"({metric_label(str(best.get('metric')))} {_number(value)})"
        )
    return text


def failure_lines(server_round: int, num_rounds: int, card: dict[str, Any]) -> list[str]:
    """A warning line per failure the card's train phase records (site or node, reason)."""
    lines = []
    for failure in (card.get("train") or {}).get("failures") or []:
        who = failure.get("site") or (
            f"node {failure['node_id']}" if failure.get("node_id") is not None else "sites"
        )
        reason = " ".join(str(failure.get("reason", "")).split())[:300]
        lines.append(f"round {server_round}/{num_rounds}: {who} failed: {reason}")
    return lines


class ProgressLine:
    """A round-loop observer that emits :func:`round_line` (and the failures) of each round
    recorded in ``run_dir``."""

    def __init__(
        self, run_dir: RunDirectory, num_rounds: int, info: Emit, warning: Emit | None = None
    ) -> None:
        self.run_dir = run_dir
        self.num_rounds = num_rounds
        self.info = info
        self.warning = warning or info

    def __call__(self, server_round: int, card: dict[str, Any], line: dict[str, Any]) -> None:
        failures = failure_lines(server_round, self.num_rounds, card)
        best = self.run_dir.read_json("best.json")
        self.info(round_line({"round": server_round, **line}, self.num_rounds, best, len(failures)))
        for text in failures:
            self.warning(text)
