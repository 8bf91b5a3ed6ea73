"""TensorBoard event files in the run directory, one step per round.

``tensorboard --logdir runs`` (or ``demo/runs``) then shows every run side by side: each run
directory is one TensorBoard run.  Written per round, with the round as the step:

- ``central/<set>/<metric>``: the coordinator's evaluation on each external set (AUC, loss,
  accuracy, and sensitivity and specificity at the round's operating point, whose threshold
  is ``central/<set>/threshold``);
- ``operating_point/threshold``, ``operating_point/tune_sensitivity`` and
  ``operating_point/tune_specificity``: the round's federated operating point and the
  pooled tune figures it was chosen for;
- ``federated/<split>-<metric>``: the sites' evaluation pooled by the strategy;
- ``train/<metric>``: the aggregated train metrics;
- ``sites/<split>-<metric>/<site>``: each site's own tune and test metrics, and
  ``sites/train-<metric>/<site>`` its train metrics (from the model card);
- ``participation/sites`` and ``participation/failures``, ``transport/download-bytes`` and
  ``transport/upload-bytes`` (weights sent to and received from the sites),
  ``time/round-seconds``;
- ``best/<metric>``: the best value so far of the run's ``best-metric``.

A sensitivity or specificity at another threshold names it: ``…_at_0.5`` (the sites' own
tune and test figures, scored before the round's operating point exists).

The run config goes in once, as text.  A resumed run purges the steps after the round it
resumes from, so a round repeated after a crash is not drawn twice.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedct.common.run.directory import RunDirectory

AUC_SUFFIX = "-auc_covid"
NOT_SCALARS = {"num-examples", "round"}
# The card's operating point: its fields and their tags under operating_point/.
OPERATING_POINT_TAGS = {
    "threshold": "threshold",
    "sensitivity": "tune_sensitivity",
    "specificity": "tune_specificity",
}


def _scalars(values: dict[str, Any] | None) -> dict[str, float]:
    """The finite numbers of ``values`` (lists, flags and strings are left out)."""
    out = {}
    for key, value in (values or {}).items():
        if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def _central_tag(key: str, sets: list[str]) -> str:
    """``mosmed-auc_covid`` → ``central/mosmed/auc_covid`` (the longest matching set name)."""
    for name in sorted(sets, key=len, reverse=True):
        if key.startswith(name + "-"):
            return f"central/{name}/{key.removeprefix(name + '-')}"
    return f"central/{key}"


def round_scalars(
    line: dict[str, Any], card: dict[str, Any], best: dict[str, Any] | None
) -> dict[str, float]:
    """Every scalar of one round, by TensorBoard tag (see the module docstring)."""
    central = _scalars(line.get("central"))
    sets = [key.removesuffix(AUC_SUFFIX) for key in central if key.endswith(AUC_SUFFIX)]
    tags = {_central_tag(key, sets): value for key, value in central.items()}
    tags.update({f"federated/{k}": v for k, v in _scalars(line.get("federated")).items()})
    tags.update({f"train/{k}": v for k, v in _scalars(line.get("train")).items()})
    for participant in (card.get("train") or {}).get("participants") or []:
        for key, value in _scalars(participant.get("metrics")).items():
            tags[f"sites/{key}/{participant.get('site')}"] = value
    for entry in (card.get("federated_evaluation") or {}).get("sites") or []:
        for key, value in _scalars(entry.get("metrics")).items():
            tags[f"sites/{key}/{entry.get('site')}"] = value
    op = card.get("operating_point")
    if isinstance(op, dict):
        for key, name in OPERATING_POINT_TAGS.items():
            if isinstance(op.get(key), int | float) and math.isfinite(op[key]):
                tags[f"operating_point/{name}"] = float(op[key])
    if line.get("round"):
        tags["participation/sites"] = float(len(line.get("sites") or {}))
        tags["participation/failures"] = float(line.get("failures") or 0)
        for key in ("download-bytes", "upload-bytes"):
            if isinstance(line.get(key), int | float):
                tags[f"transport/{key}"] = float(line[key])
    if isinstance(line.get("seconds"), int | float):
        tags["time/round-seconds"] = float(line["seconds"])
    if best and isinstance(best.get("value"), int | float):
        tags[f"best/{best.get('metric')}"] = float(best["value"])
    return tags


class TensorBoardLog:
    """A round-loop observer writing :func:`round_scalars` to event files in ``run_dir``.

    Use it as a context manager, so that the files are closed when the run ends.
    """

    def __init__(self, run_dir: RunDirectory, first_round: int, run_config: dict[str, Any]):
        # Imported here: TensorBoard takes a second or two to import, which only a run needs.
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        Path(run_dir.path).mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(
            log_dir=str(run_dir.path), purge_step=first_round if first_round > 0 else None
        )
        if first_round == 0:
            text = json.dumps(run_config, indent=2, sort_keys=True, default=str)
            self.writer.add_text("run_config", f"```\n{text}\n```", 0)

    def __call__(self, server_round: int, card: dict[str, Any], line: dict[str, Any]) -> None:
        best = self.run_dir.read_json("best.json")
        for tag, value in round_scalars({"round": server_round, **line}, card, best).items():
            self.writer.add_scalar(tag, value, server_round)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
