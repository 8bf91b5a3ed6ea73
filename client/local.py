"""What a hospital does with a global model: train it on its ``train`` split, or score it on
the splits the coordinator asks for.  Below the Flower handlers, so tests call them directly.

Only aggregate numbers leave the site: weights, scan counts and metrics.  Logs name the site,
never a scan or a patient.
"""

from __future__ import annotations

import json
from dataclasses import replace
from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common import log

from fedct.client.dp import decline_without_dp, dp_enabled, train_site_private
from fedct.client.fedbn import local_bn_path, restore_local_bn, save_local_bn
from fedct.client.site_data import Site
from fedct.common.cache.dataset import CacheDataset, make_loader
from fedct.common.classes import GLOBAL_CLASSES
from fedct.common.federation.transport import Layout, check_layout
from fedct.common.metrics.pooled_operating_point import (
    BINS_KEY,
    COVID_KEY,
    OTHER_KEY,
    score_histograms,
)
from fedct.common.model.classifier import (
    ModelConfig,
    SliceClassifier,
    build_model,
    load_travelling_state,
    travelling_state,
)
from fedct.common.training.loop import TrainConfig, score_split, train_local


class SiteDataError(ValueError):
    """The site has no scans for what the coordinator asked."""


def model_for(site: Site, config: ConfigRecord, arrays: ArrayRecord) -> SliceClassifier:
    """The global model as this site uses it: built from the coordinator's model config and
    seed (with the site's own ``slice-chunk`` if it set one), loaded with ``arrays``, and under
    FedBN with the site's own BatchNorm entries."""
    cfg = ModelConfig(**json.loads(str(config["model-config"])))
    # The full state arrives from the coordinator; only a frozen backbone (not sent) must be
    # built from pretrained weights, which each site holds itself.
    weights = (site.pretrained_weights or cfg.pretrained_weights) if cfg.freeze_backbone else None
    cfg = replace(cfg, pretrained_weights=weights, slice_chunk=site.slice_chunk or cfg.slice_chunk)
    torch.manual_seed(int(config["seed"]))
    model = build_model(cfg)
    layout = Layout.of(travelling_state(model, cfg))
    check_layout(config, layout)
    load_travelling_state(model, layout.unpack(arrays), cfg)
    if bool(config["fedbn"]):
        restore_local_bn(model, local_bn_path(site.state_dir, str(config["run-key"])))
    return model


def outgoing_arrays(model: SliceClassifier, transport: str) -> ArrayRecord:
    """The model's travelling state packed for the coordinator, floating-point entries in the
    ``transport`` dtype (common/federation/transport.py)."""
    state = travelling_state(model, model.cfg)
    return Layout.of(state).pack(state, transport)


def train_site(
    site: Site, arrays: ArrayRecord, config: ConfigRecord
) -> tuple[ArrayRecord, MetricRecord]:
    """Train the global model on the site's ``train`` split; (new arrays, metrics).

    ``num-examples`` is the number of training scans, the FedAvg weight.  With ``dp`` on, the
    round is patient-level DP-SGD (client/dp.py), which replaces the train loss and accuracy
    by ``dp-epsilon`` and ``dp-delta``; a site with an ε budget declines runs without DP.
    """
    server_round = int(config["server-round"])
    private = dp_enabled(config)
    if not private:
        decline_without_dp(site)
    model = model_for(site, config, arrays)
    data = CacheDataset(
        site.cache_dir,
        ["train"],
        max_slices=int(config["train-max-slices"]),
        seed=int(config["seed"]) + server_round,
    )
    if len(data) == 0:
        raise SiteDataError(f"site {site.name} has no training scans")
    train_cfg = TrainConfig.from_config(
        config,
        proximal_mu=float(config.get("proximal-mu", 0.0)),
        device=site.device,
        seed=int(config["seed"]) + server_round,
    )
    log(INFO, "site %s round %d: training on %d scans", site.name, server_round, len(data))
    if private:
        result, private_metrics = train_site_private(site, model, data, train_cfg, config)
    else:
        loader = make_loader(data, train_cfg.batch_size, shuffle=True, seed=train_cfg.seed)
        result = train_local(model, loader, train_cfg, class_counts=data.class_counts())
        private_metrics = {}
    if bool(config["fedbn"]):
        save_local_bn(model, local_bn_path(site.state_dir, str(config["run-key"])))
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
            "num-examples": len(data),
            "train-loss": result.loss,
            "train-accuracy": result.accuracy,
            "train-seconds": result.seconds,
            **private_metrics,
        }
    )
    return outgoing_arrays(model, str(config["transport-dtype"])), metrics


def evaluate_site(site: Site, arrays: ArrayRecord, config: ConfigRecord) -> MetricRecord:
    """Score the global model on the splits in ``config["splits"]`` (e.g. ``"tune,test"``).

    Keys ``<split>-<metric>`` for loss, auc_covid, sens_covid, spec_covid, accuracy and n, and
    auc_covid_low / auc_covid_high (the AUC's patient-level bootstrap 95 % CI, 200
    resamples), the same at every site (NaN where a site lacks a class or the split);
    ``num-examples`` is the number of scans scored.  When the config names a histogram size
    (``BINS_KEY``), the tune split's scores are also summed into per-bin counts of COVID-19
    and other scans for the federated operating point
    (common/metrics/pooled_operating_point.py): only counts leave the site, never a scan's
    score; a site without a tune split sends zeros.
    """
    model = model_for(site, config, arrays)
    splits = [s.strip() for s in str(config["splits"]).split(",") if s.strip()]
    if BINS_KEY in config and "tune" not in splits:
        splits.append("tune")
    metrics: dict[str, float | list[int]] = {}
    for split in splits:
        scores, result = score_split(
            model,
            CacheDataset(site.cache_dir, [split]),
            split,
            batch_size=int(config["batch-size"]),
            device=site.device,
            interval=("auc_covid_low", "auc_covid_high"),
        )
        metrics.update(scores)
        if split == "tune" and BINS_KEY in config:
            labels = result.labels if result else np.zeros(0, np.int64)
            probs = result.probs if result else np.zeros((0, len(GLOBAL_CLASSES)))
            covid, other = score_histograms(labels, probs, int(config[BINS_KEY]))
            metrics.update({COVID_KEY: covid.tolist(), OTHER_KEY: other.tolist()})
    scored = int(sum(metrics[f"{split}-n"] for split in splits))
    log(
        INFO,
        "site %s round %s: evaluated %d scans (%s)",
        site.name,
        config["server-round"],
        scored,
        ", ".join(f"{s} AUC {metrics[f'{s}-auc_covid']:.3f}" for s in splits),
    )
    return MetricRecord({**metrics, "num-examples": scored})
