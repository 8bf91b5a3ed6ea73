"""Loading a global model from a run directory's checkpoint or its model card.

The coordinator (common/run/directory.py) writes ``round_NNN.safetensors`` with every entry of
the model's state dict and ``round_NNN.card.json`` beside it, whose ``model_config`` rebuilds
the model, ``checkpoint`` names the weights file, ``sha256`` is that file's digest and
``run_config`` holds the run's settings and ``calibration`` (when the run fitted one) the
temperature every consumer of the model's probabilities applies (``LoadedModel.temperature``,
common/metrics/calibration.py).  Weights whose digest differs from the card are refused: the
card would then describe another model.  Evaluators and the coordinator share
this module, so both read cards the same way.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load

from fedct.common.cache.config import ABSENT_MEANS, RUN_CONFIG_KEYS, PrepareConfig
from fedct.common.metrics.calibration import Calibration
from fedct.common.metrics.operating_point import OperatingPoint
from fedct.common.model.classifier import ModelConfig, SliceClassifier, build_model
from fedct.common.run.directory import (
    CARD_SUFFIX,
    WEIGHTS_SUFFIX,
    CheckpointLoadError,
    verified_sha256,
)


@dataclass(frozen=True)
class LoadedModel:
    """A model rebuilt from its card, in eval mode on the CPU, with where it came from."""

    model: SliceClassifier
    config: ModelConfig
    card: dict[str, Any]
    card_path: Path
    weights_path: Path
    sha256: str

    calibration: Calibration | None = None

    @property
    def round(self) -> int | None:
        return self.card.get("round")

    @property
    def temperature(self) -> float:
        """The card's calibration temperature; 1.0 (the logits as they are) without one."""
        return self.calibration.temperature if self.calibration is not None else 1.0


def card_path_for(path: Path) -> Path:
    """The model card of a card or weights file (``round_NNN.safetensors`` → its card)."""
    path = Path(path)
    if path.name.endswith(CARD_SUFFIX):
        return path
    if path.suffix == WEIGHTS_SUFFIX:
        return path.with_name(path.name.removesuffix(WEIGHTS_SUFFIX) + CARD_SUFFIX)
    raise CheckpointLoadError(
        f"{path}: not a checkpoint; give a round_NNN{WEIGHTS_SUFFIX} or round_NNN{CARD_SUFFIX}"
    )


def read_card(path: Path) -> dict[str, Any]:
    """A model card as a dict; CheckpointLoadError when it is missing or not a JSON object."""
    try:
        card = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise CheckpointLoadError(
            f"{path}: model card not found; it is needed for the model config and sha256"
        ) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointLoadError(f"{path}: unreadable model card ({exc})") from exc
    if not isinstance(card, dict):
        raise CheckpointLoadError(f"{path}: a model card must be a JSON object")
    return card


def model_config_from_card(card: dict[str, Any], source: Path) -> ModelConfig:
    """The ModelConfig the card's model was built with.

    Pretrained weights are dropped: the checkpoint holds every weight, so neither the original
    weights file nor a download is needed to rebuild the model.
    """
    entries = card.get("model_config")
    if not isinstance(entries, dict):
        raise CheckpointLoadError(f"{source}: model card has no model_config object")
    # Cards written before "imagenet" became a value of pretrained_weights have this flag.
    entries = {k: v for k, v in entries.items() if k != "pretrained_from_hub"}
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown := sorted(set(entries) - known):
        raise CheckpointLoadError(
            f"{source}: model_config has fields this fedct does not know: {', '.join(unknown)}"
        )
    try:
        return ModelConfig(**entries).without_weights()
    except (TypeError, ValueError) as exc:
        raise CheckpointLoadError(f"{source}: invalid model_config ({exc})") from exc


def prepare_settings_from_card(
    card: dict[str, Any], source: Path
) -> tuple[dict[str, Any], list[str]]:
    """The cache settings (size, fraction, normalize, lung_crop) of the card's run config, and
    the names of those the card lacks, which are filled in from PrepareConfig's defaults (a
    setting added to fedct after the card was written is what it was then, ABSENT_MEANS)."""
    run_config = card.get("run_config")
    run_config = run_config if isinstance(run_config, dict) else {}
    settings = PrepareConfig().cache_settings()
    missing = []
    for name, default in settings.items():
        key = RUN_CONFIG_KEYS[name]
        if key not in run_config:
            if name in ABSENT_MEANS:
                settings[name] = ABSENT_MEANS[name]
            else:
                missing.append(name)
            continue
        if isinstance(default, bool) and not isinstance(run_config[key], bool):
            raise CheckpointLoadError(
                f"{source}: run_config {key}={run_config[key]!r} is invalid (true or false)"
            )
        try:
            settings[name] = type(default)(run_config[key])
        except (TypeError, ValueError) as exc:
            raise CheckpointLoadError(
                f"{source}: run_config {key}={run_config[key]!r} is invalid ({exc})"
            ) from exc
    return settings, missing


def operating_point_from_card(card: dict[str, Any], source: Path) -> OperatingPoint | None:
    """The card's stored operating point (``operating_point``), or None when it has none."""
    stored = card.get("operating_point")
    if stored is None:
        return None
    if not isinstance(stored, dict):
        raise CheckpointLoadError(f"{source}: operating_point must be a JSON object")
    try:
        return OperatingPoint.from_dict(stored)
    except (TypeError, ValueError) as exc:
        raise CheckpointLoadError(f"{source}: invalid operating_point ({exc})") from exc


def calibration_from_card(card: dict[str, Any], source: Path) -> Calibration | None:
    """The card's ``calibration`` (temperature, grid, chosen_on), or None when it has none."""
    stored = card.get("calibration")
    if stored is None:
        return None
    try:
        return Calibration.from_dict(stored)
    except ValueError as exc:
        raise CheckpointLoadError(f"{source}: invalid calibration ({exc})") from exc


def load_checkpoint(path: Path, *, slice_chunk: int | None = None) -> LoadedModel:
    """The model of a checkpoint or card ``path``, its sha256 checked against the card.

    For a card, the weights are the file the card names beside it (``round_NNN.safetensors``
    in a run directory) or, failing that, the file named like the card (``X.card.json`` →
    ``X.safetensors``, as ``fedct pull`` writes them).

    ``slice_chunk`` overrides the card's slices-per-forward (a memory knob that does not change
    the predictions).  Raises CheckpointLoadError naming the file for every problem.
    """
    card_path = card_path_for(path)
    card = read_card(card_path)
    if Path(path).suffix == WEIGHTS_SUFFIX:
        weights_path = Path(path)  # e.g. a pulled model.safetensors, renamed from round_NNN
    else:
        name = card.get("checkpoint")
        if not isinstance(name, str) or not name:
            raise CheckpointLoadError(f"{card_path}: model card names no checkpoint file")
        weights_path = card_path.with_name(name)
        beside = card_path.with_name(card_path.name.removesuffix(CARD_SUFFIX) + WEIGHTS_SUFFIX)
        if not weights_path.exists() and beside.exists():
            weights_path = beside  # a pulled model.card.json beside its model.safetensors
    try:
        blob = weights_path.read_bytes()
    except OSError as exc:
        raise CheckpointLoadError(f"{weights_path}: cannot read checkpoint ({exc})") from exc
    digest = verified_sha256(blob, card, weights_path, card_path)
    config = model_config_from_card(card, card_path)
    if slice_chunk is not None:
        try:
            config = dataclasses.replace(config, slice_chunk=slice_chunk)
        except ValueError as exc:
            raise CheckpointLoadError(str(exc)) from exc
    try:
        model = build_model(config)
    except RuntimeError as exc:  # timm: unknown backbone name
        raise CheckpointLoadError(f"{card_path}: cannot build {config.backbone} ({exc})") from exc
    try:
        model.load_state_dict(load(blob), strict=True)
    except (SafetensorError, RuntimeError) as exc:
        raise CheckpointLoadError(
            f"{weights_path}: weights do not fit the card's model ({exc})"
        ) from exc
    model.eval()
    calibration = calibration_from_card(card, card_path)
    return LoadedModel(model, config, card, card_path, weights_path, digest, calibration)
