"""The shape of the model a message describes, as the site's egress guard and its secure
aggregation need it: the travelling state's layout and, under FedBN, the entries that stay at
the site.  Built on the meta device and materialised uninitialised: nothing is computed, and
no pretrained weights are read."""

from __future__ import annotations

from functools import lru_cache

import torch

from fedct.common.federation.transport import Layout
from fedct.common.model.classifier import (
    ModelConfig,
    SliceClassifier,
    bn_state_keys,
    build_model,
    travelling_state,
)


@lru_cache(maxsize=4)
def _shell(cfg: ModelConfig) -> SliceClassifier:
    cfg = cfg.without_weights()
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device="cpu")
    return model


@lru_cache(maxsize=4)
def model_layout(cfg: ModelConfig) -> Layout:
    """The travelling-state layout of the model of ``cfg``."""
    cfg = cfg.without_weights()
    return Layout.of(travelling_state(_shell(cfg), cfg))


@lru_cache(maxsize=4)
def local_entries(cfg: ModelConfig, fedbn: bool) -> frozenset[str]:
    """The travelling entries a site keeps to itself: its BatchNorm entries under FedBN."""
    if not fedbn:
        return frozenset()
    cfg = cfg.without_weights()
    travelling = {name for name, _, _ in model_layout(cfg).entries}
    return frozenset(bn_state_keys(_shell(cfg)) & travelling)
