"""Patient-level DP-SGD: every optimizer step bounds and noises each *patient's* contribution.

The privacy unit is the patient (all scans of one patient), not the slice or the scan: a
patient contributes many slices and possibly several scans, so a slice- or scan-level bound
would overstate the protection.  A step

1. samples patients independently with probability ``q`` (Poisson sampling);
2. for each sampled patient, takes the exact gradient of the *sum* of that patient's scan
   losses: the backbone's per-slice contributions add up through the slice pooling, scans of
   the patient through the sum; it is computed by an ordinary backward pass over the
   patient's scans alone (``batch_size`` scans at a time, gradients accumulating);
3. hands that gradient to opacus' ``DPOptimizer`` as a one-sample ``grad_sample``, which
   clips it to norm ``C`` and adds it to the step's sum;
4. adds N(0, σ²C²) noise to the sum (opacus, ``secure_mode``), divides by the expected batch
   ``q·n`` and steps the wrapped AdamW/SGD.

Per-sample-gradient engines (opacus' GradSampleModule, torch.func) work per *input*, here per
slice: they would hold one gradient per slice and need reshaping to patients, while this
loop holds two extra copies of the trainable weights whatever the batch.  It needs a model
whose normalisation neither mixes samples nor keeps un-noised running statistics: GroupNorm
(``norm = "group"``) or frozen BatchNorm (``freeze-bn``: the pretrained statistics, scale and
shift, fixed).  The loss is unweighted, since "balanced" class weights are computed from the
site's counts and would make every patient's gradient depend on the others.

Sampling and noise draw from the operating system's entropy, never from the run's seed, which
the coordinator knows: a predictable draw would let it subtract the noise.  See docs/privacy.md.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from fedct.common.cache.dataset import ScanItem, pad_collate
from fedct.common.config_keys import read_keys, write_keys
from fedct.common.console import import_quietly
from fedct.common.model.classifier import SliceClassifier, bn_state_keys
from fedct.common.training.accounting import check_accountant, noise_for_target
from fedct.common.training.device import autocast_context, autocast_dtype, pick_device
from fedct.common.training.loop import TrainConfig, TrainResult, make_optimizer, proximal_anchor

if TYPE_CHECKING:
    from opacus.optimizers import DPOptimizer

_LOG = logging.getLogger(__name__)

# Run-config key of each DPSettings field; "num-server-rounds" sizes the noise for a target ε.
CONFIG_KEYS = {
    "enabled": "dp",
    "noise_multiplier": "dp-noise-multiplier",
    "target_epsilon": "dp-target-epsilon",
    "max_grad_norm": "dp-max-grad-norm",
    "delta": "dp-delta",
    "sample_rate": "dp-sample-rate",
    "accountant": "dp-accountant",
    "rounds": "num-server-rounds",
}
# Default δ = 0.1 / n_patients: δ must stay below 1/n, which a mechanism that publishes one
# random patient's record in full already satisfies.
DELTA_PER_PATIENT = 0.1


class PrivacyError(ValueError):
    """DP training cannot run as configured (model, loss or settings)."""


@dataclass(frozen=True)
class DPPlan:
    """One site's DP-SGD for one round, resolved from :class:`DPSettings` and its patients."""

    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float
    steps: int
    delta: float
    expected_batch_size: float  # q · n_patients: the divisor of the noisy sum

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and self.max_grad_norm > 0 and self.steps >= 1):
            raise PrivacyError("DP-SGD needs σ > 0, a clipping norm > 0 and at least one step")
        if not (0 < self.sample_rate <= 1 and 0 < self.delta < 1):
            raise PrivacyError("DP-SGD needs a sample rate in (0, 1] and δ in (0, 1)")


@dataclass(frozen=True)
class DPSettings:
    """The run's DP switch and parameters (run-config keys in :data:`CONFIG_KEYS`).

    ``target_epsilon`` 0 means "use ``noise_multiplier``"; otherwise σ is chosen so that
    ``rounds`` rounds of local training reach ε = ``target_epsilon``.  ``delta`` 0 means
    0.1 / (the site's patients); ``sample_rate`` 0 means ``batch_size`` / (the site's patients).
    """

    enabled: bool = False
    noise_multiplier: float = 1.0
    target_epsilon: float = 0.0
    max_grad_norm: float = 1.0
    delta: float = 0.0
    sample_rate: float = 0.0
    accountant: str = "rdp"
    rounds: int = 1

    def __post_init__(self) -> None:
        check_accountant(self.accountant)
        if self.noise_multiplier <= 0 or self.max_grad_norm <= 0:
            raise ValueError("dp-noise-multiplier and dp-max-grad-norm must be positive")
        if self.target_epsilon < 0 or not 0 <= self.delta < 1 or not 0 <= self.sample_rate <= 1:
            raise ValueError(
                "dp-target-epsilon must be >= 0, dp-delta in [0, 1), dp-sample-rate in [0, 1]"
            )
        if self.rounds < 1:
            raise ValueError("num-server-rounds must be at least 1")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DPSettings:
        """Read the keys of :data:`CONFIG_KEYS` from a run config or a train ConfigRecord."""
        try:
            return cls(**read_keys(cls(), CONFIG_KEYS, config, "DP"))
        except ValueError as exc:
            raise PrivacyError(str(exc)) from exc

    def to_config(self) -> dict[str, Any]:
        """The keys a train message carries, so that every site resolves the same settings."""
        return write_keys(self, CONFIG_KEYS)

    def plan(self, n_patients: int, batch_size: int, local_epochs: int) -> DPPlan:
        """The round's DP-SGD at a site of ``n_patients``: ``local_epochs`` epochs of
        round(1/q) Poisson steps each."""
        if n_patients < 1:
            raise PrivacyError("DP training needs at least one patient")
        rate = self.sample_rate or min(1.0, batch_size / n_patients)
        delta = self.delta or DELTA_PER_PATIENT / n_patients
        steps = local_epochs * max(1, round(1 / rate))
        sigma = self.noise_multiplier
        if self.target_epsilon > 0:
            sigma = noise_for_target(
                self.target_epsilon, delta, rate, steps * self.rounds, self.accountant
            )
        return DPPlan(sigma, rate, self.max_grad_norm, steps, delta, rate * n_patients)


def patient_groups(patient_ids: Sequence[str]) -> list[list[int]]:
    """Dataset indices of each patient's scans, patients in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for index, patient in enumerate(patient_ids):
        groups.setdefault(patient, []).append(index)
    return list(groups.values())


def poisson_sample(n: int, rate: float, generator: torch.Generator) -> list[int]:
    """Each of ``n`` indices independently with probability ``rate`` (possibly none)."""
    return torch.nonzero(torch.rand(n, generator=generator) < rate).flatten().tolist()


def check_private_training(model: SliceClassifier, cfg: TrainConfig) -> None:
    """PrivacyError unless ``model`` and ``cfg`` suit per-patient DP: no training BatchNorm,
    no class weighting."""
    if bn_state_keys(model) and not model.cfg.batchnorm_frozen_or_absent:
        raise PrivacyError(
            "patient-level DP needs a model without training BatchNorm, which mixes patients "
            'in a batch and keeps un-noised statistics: set norm = "group", freeze-bn = true '
            "or freeze-backbone = true"
        )
    if cfg.class_weighting != "none":
        raise PrivacyError(
            "DP training needs class-weighting = none: balanced weights come from the site's "
            "class counts, so one patient would change every other patient's gradient"
        )


def make_dp_optimizer(
    params: list[Tensor], cfg: TrainConfig, plan: DPPlan, noise: torch.Generator
) -> DPOptimizer:
    """opacus' DPOptimizer around the AdamW/SGD of ``cfg``, clipping at ``plan.max_grad_norm``.

    opacus is imported here, when DP is on, and kept from configuring the root logger."""
    optimizers = import_quietly("opacus.optimizers")
    return optimizers.DPOptimizer(
        make_optimizer(params, cfg),
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=plan.expected_batch_size,  # type: ignore[arg-type]
        generator=noise,
        secure_mode=True,
    )


def _precision(device: torch.device) -> AbstractContextManager[None]:
    """bf16 autocast where the device has it, else full precision: fp16 autocast would need
    loss scaling inside every patient's clipping."""
    if autocast_dtype(device) == torch.bfloat16:
        return autocast_context(device)
    return nullcontext()


def accumulate_patient(
    model: SliceClassifier,
    optimizer: DPOptimizer,
    scans: Sequence[ScanItem],
    device: torch.device,
    batch_size: int,
) -> tuple[float, int]:
    """Add one patient's clipped gradient to the step's sum (``p.summed_grad``).

    The gradient is that of the sum of the patient's scan losses, computed ``batch_size``
    scans at a time.  Returns (that loss, scans classified correctly).
    """
    loss_sum, correct = 0.0, 0
    for start in range(0, len(scans), batch_size):
        batch = pad_collate(scans[start : start + batch_size])
        x, mask, y = (t.to(device, non_blocking=True) for t in (batch.x, batch.mask, batch.y))
        with _precision(device):
            logits = model(x, mask)
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        loss.backward()
        loss_sum += loss.item()
        correct += int((logits.argmax(dim=1) == y).sum())
    for p in optimizer.params:
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        p.grad_sample = grad.detach().unsqueeze(0)
        p.grad = None
    optimizer.clip_and_accumulate()
    return loss_sum, correct


def noisy_step(
    model: SliceClassifier,
    optimizer: DPOptimizer,
    anchor: dict[str, Tensor] | None,
    proximal_mu: float,
) -> None:
    """Noise the step's clipped sum, divide it by the expected batch, add the FedProx term's
    gradient (data-independent, so free of privacy cost) and step."""
    if optimizer.params[0].summed_grad is None:  # no patient sampled: the step is noise alone
        for p in optimizer.params:
            p.grad_sample = p.new_zeros((0, *p.shape))
        optimizer.clip_and_accumulate()
    optimizer.add_noise()
    optimizer.scale_grad()
    if anchor is not None:
        for name, p in model.named_parameters():
            if name in anchor:
                p.grad += proximal_mu * (p.detach() - anchor[name])
    optimizer.original_optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_private(
    model: SliceClassifier,
    dataset: Dataset[ScanItem],
    patient_ids: Sequence[str],
    cfg: TrainConfig,
    plan: DPPlan,
    *,
    global_state: Mapping[str, Tensor | np.ndarray] | None = None,
    seed: int | None = None,
) -> TrainResult:
    """``plan.steps`` steps of patient-level DP-SGD on ``dataset`` (scan ``i`` belongs to
    ``patient_ids[i]``), in place.

    ``cfg`` gives the optimizer, learning rate, device, scans per forward pass
    (``batch_size``) and FedProx's μ (see :func:`check_private_training`).  ``seed`` fixes the
    sampling and the noise for tests only; ``None`` (always, in a real run) draws them from
    the operating system.  ``loss``/``accuracy`` are over the scans of the sampled patients
    and stay at the site; NaN when no patient was sampled.
    """
    check_private_training(model, cfg)
    n_scans = len(dataset)  # type: ignore[arg-type]
    if len(patient_ids) != n_scans:
        raise PrivacyError(f"{len(patient_ids)} patient ids for {n_scans} scans")
    start = time.perf_counter()
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    entropy = secrets.randbits(63) if seed is None else seed
    sampling = torch.Generator().manual_seed(entropy)
    noise = torch.Generator(device=device).manual_seed(entropy + 1)
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_dp_optimizer(params, cfg, plan, noise)
    optimizer.zero_grad(set_to_none=True)
    anchor = proximal_anchor(model, global_state, device) if cfg.proximal_mu > 0 else None
    patients = patient_groups(patient_ids)

    loss_sum, correct, seen = 0.0, 0, 0
    for _ in range(plan.steps):
        for patient in poisson_sample(len(patients), plan.sample_rate, sampling):
            scans = [dataset[i] for i in patients[patient]]
            loss, right = accumulate_patient(model, optimizer, scans, device, cfg.batch_size)
            loss_sum, correct, seen = loss_sum + loss, correct + right, seen + len(scans)
        noisy_step(model, optimizer, anchor, cfg.proximal_mu)
    result = TrainResult(
        loss_sum / seen if seen else math.nan,
        seen,
        correct / seen if seen else math.nan,
        time.perf_counter() - start,
    )
    _LOG.debug(
        "DP-SGD: %d steps (σ %.3f, q %.3f, C %.3g) over %d scans in %.1f s: loss %.4f",
        plan.steps,
        plan.noise_multiplier,
        plan.sample_rate,
        plan.max_grad_norm,
        seen,
        result.seconds,
        result.loss,
    )
    return result
