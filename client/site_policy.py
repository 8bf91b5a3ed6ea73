"""The site's policy: how much a coordinator's message may ask of a hospital.

A message proposes, the site decides.  The schema (common/federation/messages.py) fixes the
form of every message; this policy, read from the SuperNode's node config, bounds what a
well-formed message may ask: the resources a round may take and what the site's answers may
reveal.  A message beyond it is refused, before any data is read, with one fixed reason such
as ``policy: batch-size 64 > 16 (max-batch-size)``.

Node-config keys, their defaults, and why:

- ``max-batch-size`` (16): scans per step; the input alone is batch × slices × size² floats
  (16 × 64 × 512² ≈ 1 GiB).
- ``max-slice-chunk`` (64): slices per backbone pass, which activation memory grows with (a
  site that sets its own ``slice-chunk`` uses it instead of the message's).
- ``max-local-epochs`` (10): the compute one round may take.
- ``allowed-backbones`` (``efficientnet_b[0-3],tf_efficientnet_b[0-3],
  tf_efficientnet_lite[0-4],test_efficientnet*``): the models the site will build, as shell
  patterns (memory and compute).
- ``max-histogram-bins`` (64): the resolution at which the tune split's scores are shown.
- ``min-histogram-scans`` (10): the smallest tune split whose histograms are sent; a smaller
  one sends zeros.
- ``dp-delta`` (0.1 / the site's patients): the δ at which the site's ε budget is checked; a
  run's larger δ is refused (client/dp.py).
- ``require-secure-aggregation`` (false): the site sends its model and metrics only through
  secure aggregation; plain train and evaluate messages are refused, so a coordinator cannot
  switch the protection off for this site.
- ``secagg-min-sites`` (3): the fewest participants of a secure aggregation the site joins
  (with two, each site reads the other's update off the next global model).
- ``secagg-min-degree`` (10): the fewest neighbours the site accepts in the SecAgg+ graph (all
  other participants where there are fewer): its input is hidden unless the coordinator learns
  the masks it shares with every one of them.
- ``secagg-min-threshold`` (0.6): the smallest fraction of the holders of a site's shares the
  coordinator must hear from to rebuild a secret.  Holders reveal one of a site's two secrets,
  never both, so a coordinator that wants both needs 2t - (degree + 1) holders colluding with
  it; 0.6 keeps that above a fifth of them.

The secure-aggregation rules bound what a hostile coordinator can ask of the protocol (client/
secagg.py checks every stage against what the site saw); what they cannot stop is in
docs/threat-model.md.

The histogram rules bound the resolution at which a coordinator sees the tune split's scores:
with at most 64 bins over at least 10 scans, the histograms show the scores' distribution,
not one scan's score to three digits (200 bins over 4 scans did).  They cannot stop a crafted
model from testing whether one patient is in the split (any aggregate can do that): that is
what the site's DP budget is for (docs/privacy.md, docs/threat-model.md).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedct.client.site_data import SiteConfigError
from fedct.common.config_keys import fits, kind_text
from fedct.common.federation.messages import Instruction, SecAggKeys, TrainInstruction
from fedct.common.federation.site_error import PolicyError, number

DEFAULT_BACKBONES = (
    "efficientnet_b[0-3]",
    "tf_efficientnet_b[0-3]",
    "tf_efficientnet_lite[0-4]",
    "test_efficientnet*",
)
# Node-config key of each policy field.
NODE_KEYS = {
    "max_batch_size": "max-batch-size",
    "max_slice_chunk": "max-slice-chunk",
    "max_local_epochs": "max-local-epochs",
    "allowed_backbones": "allowed-backbones",
    "max_histogram_bins": "max-histogram-bins",
    "min_histogram_scans": "min-histogram-scans",
    "dp_delta": "dp-delta",
    "require_secure_aggregation": "require-secure-aggregation",
    "secagg_min_sites": "secagg-min-sites",
    "secagg_min_degree": "secagg-min-degree",
    "secagg_min_threshold": "secagg-min-threshold",
}


@dataclass(frozen=True)
class SitePolicy:
    """The bounds of the module docstring; ``dp_delta`` 0 means 0.1 / the site's patients."""

    max_batch_size: int = 16
    max_slice_chunk: int = 64
    max_local_epochs: int = 10
    allowed_backbones: tuple[str, ...] = DEFAULT_BACKBONES
    max_histogram_bins: int = 64
    min_histogram_scans: int = 10
    dp_delta: float = 0.0
    require_secure_aggregation: bool = False
    secagg_min_sites: int = 3
    secagg_min_degree: int = 10
    secagg_min_threshold: float = 0.6

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SitePolicy:
        """The policy a SuperNode's node config sets; SiteConfigError naming a key whose
        value is unusable."""
        values: dict[str, Any] = {}
        for field in fields(cls):
            key = NODE_KEYS[field.name]
            if key not in node_config or node_config[key] == "":
                continue
            value = node_config[key]
            if field.name == "allowed_backbones":
                patterns = tuple(p.strip() for p in str(value).split(",") if p.strip())
                if not patterns:
                    raise SiteConfigError(f"node config {key}: no backbone pattern")
                values[field.name] = patterns
                continue
            kind = type(field.default)
            if not fits(value, kind):
                raise SiteConfigError(f"node config {key} = {value!r} must be {kind_text(kind)}")
            values[field.name] = kind(value)
        policy = cls(**values)
        policy.check_own_values()
        return policy

    def check_own_values(self) -> None:
        """SiteConfigError for bounds that would refuse everything or make no sense."""
        counts = ("max_batch_size", "max_slice_chunk", "max_local_epochs", "max_histogram_bins")
        for name in counts:
            if getattr(self, name) < 1:
                raise SiteConfigError(f"node config {NODE_KEYS[name]} must be at least 1")
        if self.min_histogram_scans < 1:
            raise SiteConfigError("node config min-histogram-scans must be at least 1")
        if not 0 <= self.dp_delta < 1:
            raise SiteConfigError("node config dp-delta must be in (0, 1), or 0 for the default")
        if self.secagg_min_sites < 3:
            raise SiteConfigError("node config secagg-min-sites must be at least 3")
        if self.secagg_min_degree < 2:
            raise SiteConfigError("node config secagg-min-degree must be at least 2")
        if not 0.5 <= self.secagg_min_threshold <= 1:
            raise SiteConfigError("node config secagg-min-threshold must be in [0.5, 1]")

    def check(self, instruction: Instruction, own_slice_chunk: int | None = None) -> None:
        """PolicyError for the first thing ``instruction`` asks beyond this policy; the
        message's ``slice-chunk`` is not bounded where the site uses its own."""
        model = instruction.model
        if instruction.batch_size > self.max_batch_size:
            self._refuse("batch-size", instruction.batch_size, self.max_batch_size)
        if own_slice_chunk is None and model.slice_chunk > self.max_slice_chunk:
            self._refuse("slice-chunk", model.slice_chunk, self.max_slice_chunk)
        if not any(fnmatch.fnmatchcase(model.backbone, p) for p in self.allowed_backbones):
            raise PolicyError(f"backbone {model.backbone} is not among allowed-backbones")
        if isinstance(instruction, TrainInstruction):
            epochs = instruction.training.local_epochs
            if epochs > self.max_local_epochs:
                self._refuse("local-epochs", epochs, self.max_local_epochs)
        bins = getattr(instruction, "histogram_bins", None)
        if bins is not None and bins > self.max_histogram_bins:
            self._refuse("tune-histogram-bins", bins, self.max_histogram_bins)

    def check_plain(self) -> None:
        """PolicyError for a plain train or evaluate message at a site that sends its model and
        metrics only through secure aggregation."""
        if self.require_secure_aggregation:
            raise PolicyError(
                "the site answers only through secure aggregation (require-secure-aggregation)"
            )

    def check_secure_aggregation(self, stage: SecAggKeys) -> None:
        """PolicyError for a secure aggregation weaker than this policy accepts."""
        sites = len(stage.participants)
        if sites < self.secagg_min_sites:
            raise PolicyError(
                f"secure aggregation over {sites} sites < {self.secagg_min_sites} "
                "(secagg-min-sites)"
            )
        degree = min(self.secagg_min_degree, sites - 1)
        if stage.degree < degree:
            raise PolicyError(f"secagg-degree {stage.degree} < {degree} (secagg-min-degree)")
        needed = math.ceil(self.secagg_min_threshold * stage.holders - 1e-9)
        if stage.threshold < needed:
            raise PolicyError(
                f"secagg-threshold {stage.threshold} of {stage.holders} holders < "
                f"{self.secagg_min_threshold:g} of them (secagg-min-threshold)"
            )

    @staticmethod
    def _refuse(key: str, asked: float, bound: float) -> None:
        node_key = "max-histogram-bins" if key == "tune-histogram-bins" else f"max-{key}"
        raise PolicyError(f"{key} {number(asked)} > {number(bound)} ({node_key})")
