"""Local training and evaluation of the scan classifier on one site's data.

Both run on the device of :mod:`fedct.common.training.device` (CUDA with mixed precision when
present) and consume loaders of :class:`fedct.common.cache.dataset.Batch`.  Neither prints scan
or patient ids; a one-line summary goes to the ``fedct.common.training.loop`` logger at DEBUG
(shown with ``--verbose``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import track
from torch import Tensor
from torch.utils.data import Dataset

from fedct.common.cache.dataset import UNLABELLED, Batch, ScanItem, make_loader
from fedct.common.classes import GLOBAL_CLASSES
from fedct.common.config_keys import read_keys, write_keys
from fedct.common.console import err
from fedct.common.metrics.bootstrap import auc_interval
from fedct.common.metrics.classification import summarize
from fedct.common.model.classifier import SliceClassifier
from fedct.common.training.device import AMP_MODES, amp_dtype, autocast_context, pick_device

_LOG = logging.getLogger(__name__)
RATES = ("sens_covid", "spec_covid")  # the summary's rates at a threshold
AT_HALF = "_at_0.5"  # their names' suffix when no operating point is known: at 0.5
_T = TypeVar("_T")

# The run-config keys of a site's optimisation, as train messages carry them.  ``proximal-mu``
# is not among them: Flower's FedProx adds it to its own messages, and no other strategy may.
CONFIG_KEYS = {
    "local_epochs": "local-epochs",
    "lr": "lr",
    "batch_size": "batch-size",
    "optimizer": "optimizer",
    "weight_decay": "weight-decay",
    "class_weighting": "class-weighting",
}


@dataclass(frozen=True)
class TrainConfig:
    """Local optimisation settings of one site (``batch_size`` is for building its loader)."""

    local_epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 2
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 1e-4
    momentum: float = 0.9
    class_weighting: Literal["balanced", "none"] = "balanced"
    proximal_mu: float = 0.0
    max_grad_norm: float | None = None
    device: str = "auto"
    seed: int = 0
    amp: str = "auto"  # auto (bf16 on CUDA, none on the CPU), off, bf16, fp16: see device.py

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.class_weighting not in ("balanced", "none"):
            raise ValueError(
                f"class_weighting must be 'balanced' or 'none', got {self.class_weighting!r}"
            )
        if self.local_epochs < 1 or self.batch_size < 1:
            raise ValueError("local_epochs and batch_size must be at least 1")
        if self.lr <= 0 or self.weight_decay < 0 or self.proximal_mu < 0:
            raise ValueError("lr must be positive; weight_decay and proximal_mu not negative")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive, got {self.max_grad_norm}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **fields: Any) -> TrainConfig:
        """The keys of :data:`CONFIG_KEYS` read from a run config or a train ConfigRecord,
        with ``fields`` (those a site sets itself) on top; raises ValueError."""
        return cls(**read_keys(cls(), CONFIG_KEYS, config, "training"), **fields)

    def to_config(self) -> dict[str, Any]:
        """The keys a train message carries."""
        return write_keys(self, CONFIG_KEYS)


@dataclass(frozen=True)
class TrainResult:
    """``loss``: mean class-weighted cross entropy (proximal term excluded) over the scans seen;
    ``num_examples``: scans seen over all local epochs."""

    loss: float
    num_examples: int
    accuracy: float
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    """Per-scan predictions of an evaluation, in loader order; ``loss`` is the mean unweighted
    cross entropy of the labelled scans (NaN when none is)."""

    loss: float
    probs: np.ndarray  # (N, C) float64
    labels: np.ndarray  # (N,) int64
    scan_ids: list[str]
    patient_ids: list[str]
    seconds: float

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    @property
    def accuracy(self) -> float:
        return float((self.probs.argmax(axis=1) == self.labels).mean())


def balanced_class_weights(class_counts: Sequence[int]) -> Tensor:
    """Weights n / (C · n_c), as scikit-learn's "balanced"; classes without examples get 0."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.dim() != 1 or bool((counts < 0).any()) or counts.sum() <= 0:
        raise ValueError(f"class_counts must be non-negative with a positive sum: {class_counts}")
    present = counts > 0
    weights = torch.zeros_like(counts)
    weights[present] = counts.sum() / (len(counts) * counts[present])
    return weights.float()


def _loss_weights(
    cfg: TrainConfig, class_counts: Sequence[int] | None, num_classes: int
) -> Tensor | None:
    if cfg.class_weighting == "none":
        return None
    if class_counts is None:
        raise ValueError("class_weighting='balanced' needs the training set's class_counts")
    if len(class_counts) != num_classes:
        raise ValueError(f"{len(class_counts)} class counts given for {num_classes} classes")
    return balanced_class_weights(class_counts)


def make_optimizer(params: list[Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def proximal_anchor(
    model: SliceClassifier,
    global_state: Mapping[str, Tensor | np.ndarray] | None,
    device: torch.device,
) -> dict[str, Tensor]:
    """The global weights FedProx pulls towards: ``global_state`` or, without one, the weights
    the model starts local training from (which a client has just received)."""
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if global_state is None:
        return {name: p.detach().clone() for name, p in trainable.items()}
    missing = sorted(set(trainable) - set(global_state))
    if missing:
        raise KeyError(f"global_state lacks trainable parameters: {', '.join(missing[:5])}")
    return {
        name: torch.as_tensor(global_state[name]).to(device=device, dtype=p.dtype)
        for name, p in trainable.items()
    }


def _proximal_term(model: SliceClassifier, anchor: dict[str, Tensor]) -> Tensor:
    terms = [
        (p - anchor[name]).pow(2).sum() for name, p in model.named_parameters() if name in anchor
    ]
    return torch.stack(terms).sum()


def _batches(loader: Iterable[_T], description: str, progress: bool) -> Iterator[_T]:
    if not progress:
        return iter(loader)
    total = len(loader) if isinstance(loader, Sized) else None
    return iter(track(loader, description=description, total=total, transient=True, console=err))


def _on_device(batch: Batch, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(t.to(device, non_blocking=True) for t in (batch.x, batch.mask, batch.y))


def train_local(
    model: SliceClassifier,
    loader: Iterable[Batch],
    cfg: TrainConfig,
    *,
    class_counts: Sequence[int] | None = None,
    global_state: Mapping[str, Tensor | np.ndarray] | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.local_epochs`` over ``loader``.

    Class-weighted cross entropy when ``cfg.class_weighting == "balanced"`` (weights from
    ``class_counts``, the site's training-set counts).  With ``cfg.proximal_mu > 0`` the FedProx
    term (mu/2)·||w − w_global||² over trainable parameters is added, ``w_global`` being
    ``global_state`` or the starting weights.  Only trainable parameters are optimised.
    Deterministic on CPU for a given ``cfg.seed``; the model is left on the training device.
    """
    start = time.perf_counter()
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    weights = _loss_weights(cfg, class_counts, model.cfg.num_classes)
    weights = None if weights is None else weights.to(device)
    anchor = proximal_anchor(model, global_state, device) if cfg.proximal_mu > 0 else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device, cfg.amp) == torch.float16)

    loss_sum, correct, seen = 0.0, 0, 0
    for epoch in range(cfg.local_epochs):
        description = f"train epoch {epoch + 1}/{cfg.local_epochs}"
        for batch in _batches(loader, description, progress):
            x, mask, y = _on_device(batch, device)
            with autocast_context(device, cfg.amp):
                logits = model(x, mask)
            loss = F.cross_entropy(logits.float(), y, weight=weights)
            objective = loss
            if anchor is not None:
                objective = loss + cfg.proximal_mu / 2 * _proximal_term(model, anchor)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(objective).backward()
            if cfg.max_grad_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(dim=1) == y).sum())
            seen += len(y)
    if seen == 0:
        raise ValueError("the training loader yielded no scans")
    result = TrainResult(loss_sum / seen, seen, correct / seen, time.perf_counter() - start)
    _LOG.debug(
        "trained %d epoch(s) on %d scans in %.1f s: loss %.4f, accuracy %.3f",
        cfg.local_epochs,
        seen,
        result.seconds,
        result.loss,
        result.accuracy,
    )
    return result


def evaluate(
    model: SliceClassifier,
    loader: Iterable[Batch],
    device: str | torch.device = "auto",
    *,
    progress: bool = False,
    amp: str = "auto",
    temperature: float = 1.0,
) -> EvalResult:
    """Predict every scan of ``loader`` without gradients (mixed precision as ``amp`` asks,
    by default on CUDA only).  The logits are divided by ``temperature`` before the softmax
    and the loss: a model card's calibration (common/metrics/calibration.py), 1.0 without."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    start = time.perf_counter()
    target = pick_device(device)
    model.to(target)
    model.eval()
    loss_sum = 0.0
    probs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    scan_ids: list[str] = []
    patient_ids: list[str] = []
    with torch.inference_mode():
        for batch in _batches(loader, "evaluate", progress):
            x, mask, y = _on_device(batch, target)
            with autocast_context(target, amp):
                logits = model(x, mask)
            logits = logits.double() / temperature
            loss_sum += F.cross_entropy(logits, y, reduction="sum", ignore_index=UNLABELLED).item()
            probs.append(logits.softmax(dim=1).cpu().numpy())
            labels.append(y.cpu().numpy())
            scan_ids.extend(batch.scan_ids)
            patient_ids.extend(batch.patient_ids)
    if not labels:
        raise ValueError("the evaluation loader yielded no scans")
    labelled = int(sum((part != UNLABELLED).sum() for part in labels))
    result = EvalResult(
        loss_sum / labelled if labelled else math.nan,
        np.concatenate(probs),
        np.concatenate(labels).astype(np.int64),
        scan_ids,
        patient_ids,
        time.perf_counter() - start,
    )
    _LOG.debug(
        "evaluated %d scans in %.1f s: loss %.4f, accuracy %.3f",
        result.num_examples,
        result.seconds,
        result.loss,
        result.accuracy,
    )
    return result


def score_split(
    model: SliceClassifier,
    data: Dataset[ScanItem],
    prefix: str,
    *,
    batch_size: int,
    device: str | torch.device = "auto",
    interval: tuple[str, str] | None = None,
    boot_keys: Mapping[str, str] | None = None,
    n_boot: int = 200,
    threshold: float | None = None,
) -> tuple[dict[str, float], EvalResult | None]:
    """Score ``model`` on ``data``: the headline metrics (``summarize``) and the loss, named
    ``<prefix>-<metric>``, and the evaluation itself (None for an empty split, whose metrics
    are NaN).  With ``interval``, its two names get the COVID-19 AUC's patient-bootstrap
    95 % CI over ``n_boot`` resamples, patients resampled under ``boot_keys[patient]``
    (default: their pseudonyms).

    Sensitivity and specificity are at ``threshold`` (the federated operating point), which
    is recorded as ``<prefix>-threshold``; without one they are at 0.5 and named
    ``sens_covid_at_0.5`` and ``spec_covid_at_0.5``, so that nobody takes them for the
    operating point's."""
    result = None
    labels, probs, loss = np.zeros(0, np.int64), np.zeros((0, len(GLOBAL_CLASSES))), math.nan
    if len(data) > 0:  # type: ignore[arg-type]
        result = evaluate(model, make_loader(data, batch_size), device)
        labels, probs, loss = result.labels, result.probs, result.loss
    summary: dict[str, float] = {
        **summarize(labels, probs, threshold=0.5 if threshold is None else threshold),
        "loss": loss,
    }
    if threshold is None:
        for rate in RATES:
            summary[f"{rate}{AT_HALF}"] = summary.pop(rate)
    else:
        summary["threshold"] = float(threshold)
    if interval is not None:
        patients = result.patient_ids if result is not None else []
        boot_ids = [boot_keys[p] for p in patients] if boot_keys is not None else patients
        bounds = (
            auc_interval(labels, probs, boot_ids, n_boot=n_boot) if patients else (math.nan,) * 2
        )
        summary.update(zip(interval, bounds, strict=True))
    return {f"{prefix}-{key}": value for key, value in summary.items()}, result
