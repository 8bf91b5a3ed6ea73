"""What a hospital does with a global model: train it on its ``train`` split, or score it on
the splits the coordinator asks for.  Below the Flower handlers, so tests call them directly.

Both take an instruction already parsed by the message schema (common/federation/messages.py)
and checked against the site's policy (client/site_policy.py).  Only aggregate numbers leave
the site: weights, scan counts and metrics.  Logs name the site, never a scan or a patient.
"""

from __future__ import annotations

from dataclasses import replace
from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.common import log

from fedct.client.dp import decline_without_dp, train_site_private
from fedct.client.fedbn import local_bn_path, restore_local_bn, save_local_bn
from fedct.client.site_data import Site
from fedct.client.site_policy import SitePolicy
from fedct.common.cache.dataset import CacheDataset, make_loader
from fedct.common.classes import GLOBAL_CLASSES
from fedct.common.federation.messages import (
    COVID_KEY,
    INTERVAL_KEYS,
    OTHER_KEY,
    WEIGHT_KEY,
    EvaluateInstruction,
    Instruction,
    TrainInstruction,
)
from fedct.common.federation.site_error import PolicyError
from fedct.common.federation.transport import Layout, TransportError
from fedct.common.metrics.pooled_operating_point import score_histograms
from fedct.common.model.classifier import (
    SliceClassifier,
    build_model,
    load_travelling_state,
    travelling_state,
)
from fedct.common.model.weights import IMAGENET, PACKAGED
from fedct.common.training.loop import EvalResult, score_split, train_local


class SiteDataError(ValueError):
    """The site has no scans for what the coordinator asked."""


def frozen_backbone_weights(site: Site, backbone: str) -> str:
    """The starting weights of a frozen backbone, which the message does not carry: the
    site's own (node-config ``pretrained-weights``), else the ImageNet weights a package
    ships for ``backbone``.  Never a download, never a path from the message."""
    weights = site.pretrained_weights or IMAGENET
    if weights == IMAGENET and backbone not in PACKAGED:
        raise PolicyError(
            f"a frozen {backbone} needs starting weights the site holds (node-config "
            "pretrained-weights)"
        )
    return weights


def model_for(site: Site, instruction: Instruction, arrays: ArrayRecord) -> SliceClassifier:
    """The global model as this site uses it: built from the instruction's model and seed
    (with the site's own ``slice-chunk`` if it set one), loaded with ``arrays``, and under
    FedBN with the site's own BatchNorm entries."""
    cfg = instruction.model
    # The full state arrives from the coordinator; only a frozen backbone (not sent) must be
    # built from starting weights, which each site holds itself.
    weights = frozen_backbone_weights(site, cfg.backbone) if cfg.freeze_backbone else None
    cfg = replace(cfg, pretrained_weights=weights, slice_chunk=site.slice_chunk or cfg.slice_chunk)
    torch.manual_seed(instruction.seed)
    model = build_model(cfg)
    layout = Layout.of(travelling_state(model, cfg))
    if instruction.layout != layout.fingerprint:
        raise TransportError(
            f"the weights were packed for model layout {instruction.layout}, this site's model "
            f"is {layout.fingerprint}: the coordinator and this site build different models "
            "(check that both run the same fedct and timm versions)"
        )
    load_travelling_state(model, layout.unpack(arrays), cfg)
    if instruction.fedbn:
        restore_local_bn(model, local_bn_path(site.state_dir, instruction.state_name))
    return model


def outgoing_arrays(model: SliceClassifier, transport: str) -> ArrayRecord:
    """The model's travelling state packed for the coordinator, floating-point entries in the
    ``transport`` dtype (common/federation/transport.py)."""
    state = travelling_state(model, model.cfg)
    return Layout.of(state).pack(state, transport)


def train_site(
    site: Site,
    instruction: TrainInstruction,
    arrays: ArrayRecord,
    policy: SitePolicy | None = None,
) -> tuple[ArrayRecord, MetricRecord]:
    """Train the global model on the site's ``train`` split; (new arrays, metrics).

    ``num-examples`` is the number of training scans, the FedAvg weight.  With ``dp`` on, the
    round is patient-level DP-SGD (client/dp.py), which replaces the train loss and accuracy
    by ``dp-epsilon`` and ``dp-delta``; a site with an ε budget declines runs without DP.
    The instruction is first held to ``policy`` (the defaults when None).
    """
    policy = policy or SitePolicy()
    policy.check(instruction, site.slice_chunk)
    server_round = instruction.server_round
    private = instruction.privacy.enabled
    if not private:
        decline_without_dp(site)
    model = model_for(site, instruction, arrays)
    seed = instruction.seed + server_round
    data = CacheDataset(
        site.cache_dir, ["train"], max_slices=instruction.train_max_slices, seed=seed
    )
    if len(data) == 0:
        raise SiteDataError(f"site {site.name} has no training scans")
    train_cfg = replace(instruction.training, device=site.device, seed=seed)
    log(INFO, "site %s round %d: training on %d scans", site.name, server_round, len(data))
    if private:
        result, private_metrics = train_site_private(
            site, model, data, train_cfg, instruction, policy
        )
    else:
        loader = make_loader(data, train_cfg.batch_size, shuffle=True, seed=train_cfg.seed)
        result = train_local(model, loader, train_cfg, class_counts=data.class_counts())
        private_metrics = {}
    if instruction.fedbn:
        save_local_bn(model, local_bn_path(site.state_dir, instruction.state_name))
    log(
        INFO,
        "site %s round %d: %d epoch(s) in %.1f s, loss %.4f, accuracy %.3f",
        site.name,
        server_round,
        train_cfg.local_epochs,
        result.seconds,
        result.loss,
        result.accuracy,
    )
    metrics = MetricRecord(
        {
            WEIGHT_KEY: len(data),
            "train-loss": result.loss,
            "train-accuracy": result.accuracy,
            "train-seconds": result.seconds,
            **private_metrics,
        }
    )
    return outgoing_arrays(model, instruction.transport_dtype), metrics


def evaluate_site(
    site: Site,
    instruction: EvaluateInstruction,
    arrays: ArrayRecord,
    policy: SitePolicy | None = None,
) -> MetricRecord:
    """Score the global model on the instruction's splits (e.g. tune and test).

    Keys ``<split>-<metric>`` for loss, auc_covid, sens_covid_at_0.5, spec_covid_at_0.5 (at a
    fixed 0.5: the operating point is chosen later, on the pooled histograms), accuracy and n, and
    auc_covid_low / auc_covid_high (the AUC's patient-level bootstrap 95 % CI, 200
    resamples), the same at every site (NaN where a site lacks a class or the split);
    ``num-examples`` is the number of scans scored.  When the instruction asks for score
    histograms, the tune split's scores are also summed into per-bin counts of COVID-19 and
    other scans for the federated operating point (common/metrics/pooled_operating_point.py):
    only counts leave the site, never a scan's score.  A site whose tune split is smaller than
    its policy's ``min-histogram-scans`` (or empty) sends zeros.
    """
    policy = policy or SitePolicy()
    policy.check(instruction, site.slice_chunk)
    model = model_for(site, instruction, arrays)
    metrics: dict[str, float | list[int]] = {}
    for split in instruction.scored_splits:
        scores, result = score_split(
            model,
            CacheDataset(site.cache_dir, [split]),
            split,
            batch_size=instruction.batch_size,
            device=site.device,
            interval=INTERVAL_KEYS,
        )
        metrics.update(scores)
        if split == "tune" and instruction.histogram_bins is not None:
            covid, other = _histograms(site, result, instruction.histogram_bins, policy)
            metrics.update({COVID_KEY: covid.tolist(), OTHER_KEY: other.tolist()})
    scored = int(sum(metrics[f"{split}-n"] for split in instruction.scored_splits))
    log(
        INFO,
        "site %s round %s: evaluated %d scans (%s)",
        site.name,
        instruction.server_round,
        scored,
        ", ".join(f"{s} AUC {metrics[f'{s}-auc_covid']:.3f}" for s in instruction.scored_splits),
    )
    return MetricRecord({**metrics, WEIGHT_KEY: scored})


def _histograms(
    site: Site, result: EvalResult | None, bins: int, policy: SitePolicy
) -> tuple[np.ndarray, np.ndarray]:
    """The tune split's score histograms, or zeros where the split is smaller than the
    policy's ``min-histogram-scans``."""
    labels = result.labels if result else np.zeros(0, np.int64)
    probs = result.probs if result else np.zeros((0, len(GLOBAL_CLASSES)))
    if 0 < labels.size < policy.min_histogram_scans:
        log(
            INFO,
            "site %s: tune histograms withheld (%d scans < min-histogram-scans %d)",
            site.name,
            labels.size,
            policy.min_histogram_scans,
        )
        labels, probs = labels[:0], probs[:0]
    return score_histograms(labels, probs, bins)
