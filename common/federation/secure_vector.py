"""What a site's secure-aggregation input holds, in which order, and how the coordinator reads
the sum: one layout, which both ends derive from the instruction (common/federation/secagg.py
has the field and the masks).

The input is a vector of reals:

1. **weights** (train only): every entry of the travelling state, FedBN's local BatchNorm
   entries left out, as the site's update times its example count, n · (w_site − w_global);
2. **counts**: ``num-examples`` and every ``<split>-n``, as they are;
3. **averaged metrics**: for each, (w · v, w), w being the count it is weighted by
   (``<split>-n`` where the reply has it, else ``num-examples``) and v its value; both 0 where
   v is not finite, so that the decoded mean skips NaN exactly as fedct's plain metric
   aggregation does (:func:`weight_key_of` is the rule both use);
4. **histograms** (evaluate, when asked): the tune split's COVID-19 and other counts per bin,
   and 1 for a site whose histograms are not all zeros (how many sites the pool holds).

A site's confidence bounds (``*_low``, ``*_high``) are not sent: a mean of bounds is no
interval, and the plain aggregation drops them too.  The coordinator learns the sums: the
mean update, the total counts, the weighted means of the metrics, the pooled histograms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedct.common.federation.messages import (
    COVID_KEY,
    HISTOGRAM_KEYS,
    OTHER_KEY,
    WEIGHT_KEY,
    EvaluateInstruction,
    Instruction,
    reply_rules,
)
from fedct.common.federation.transport import Layout

SITE_ONLY_SUFFIXES = ("_low", "_high")
COUNT_SUFFIX = "-n"


def is_count(key: str, weight_key: str = WEIGHT_KEY) -> bool:
    """Whether a metric is a count, summed rather than averaged."""
    return key == weight_key or key.endswith(COUNT_SUFFIX)


def weight_key_of(key: str, keys: Any, weight_key: str = WEIGHT_KEY) -> str:
    """The count a metric is weighted by: ``<split>-n`` when the reply has it (evaluation
    replies report splits of different sizes), else ``weight_key``."""
    if "-" in key and (count := key.split("-", 1)[0] + COUNT_SUFFIX) in keys:
        return count
    return weight_key


@dataclass(frozen=True)
class SecureSum:
    """A decoded secure sum: the example-weighted mean update of each weights entry, the
    aggregated metrics (counts summed, the rest weighted means, NaN without weight), and the
    pooled histograms with the number of sites in the pool."""

    update: dict[str, np.ndarray]
    metrics: dict[str, float]
    histograms: tuple[np.ndarray, np.ndarray] | None
    histogram_sites: int


@dataclass(frozen=True)
class VectorSpec:
    """The entries of a secure-aggregation input, in order (see the module docstring)."""

    weights: tuple[tuple[str, tuple[int, ...]], ...]
    counts: tuple[str, ...]
    averaged: tuple[tuple[str, str], ...]  # (metric, the count it is weighted by)
    histogram_bins: int = 0

    @classmethod
    def for_instruction(
        cls, instruction: Instruction, layout: Layout, local_keys: frozenset[str] = frozenset()
    ) -> VectorSpec:
        """The input's layout for a reply to ``instruction``: ``layout`` is the model's
        travelling state, ``local_keys`` its entries that stay at the sites (FedBN)."""
        keys = sorted(k for k in reply_rules(instruction) if k not in HISTOGRAM_KEYS)
        keys = [k for k in keys if not k.endswith(SITE_ONLY_SUFFIXES)]
        weights: tuple[tuple[str, tuple[int, ...]], ...] = ()
        if not isinstance(instruction, EvaluateInstruction):
            weights = tuple(
                (name, shape) for name, shape, _ in layout.entries if name not in local_keys
            )
        bins = getattr(instruction, "histogram_bins", None) or 0
        return cls(
            weights=weights,
            counts=tuple(k for k in keys if is_count(k)),
            averaged=tuple((k, weight_key_of(k, keys)) for k in keys if not is_count(k)),
            histogram_bins=bins,
        )

    @property
    def weights_size(self) -> int:
        return sum(math.prod(shape) for _, shape in self.weights)

    @property
    def length(self) -> int:
        histograms = 2 * self.histogram_bins + 1 if self.histogram_bins else 0
        return self.weights_size + len(self.counts) + 2 * len(self.averaged) + histograms

    def encode(
        self, metrics: Mapping[str, Any], update: Mapping[str, np.ndarray] | None = None
    ) -> np.ndarray:
        """A site's input: ``update`` (w_site − w_global of each weights entry) times its
        ``num-examples``, then the metrics of its plain reply ``metrics``."""
        parts: list[np.ndarray] = []
        if self.weights:
            if update is None:
                raise ValueError("a train input needs the site's update")
            weight = float(metrics[WEIGHT_KEY])
            parts += [
                weight * np.asarray(update[name], np.float64).reshape(-1)
                for name, _ in self.weights
            ]
        parts.append(np.array([float(metrics[key]) for key in self.counts]))
        pairs = []
        for key, count in self.averaged:
            value, weight = float(metrics[key]), float(metrics[count])
            pairs += [weight * value, weight] if math.isfinite(value) else [0.0, 0.0]
        parts.append(np.array(pairs, np.float64))
        if self.histogram_bins:
            covid = np.asarray(metrics[COVID_KEY], np.float64)
            other = np.asarray(metrics[OTHER_KEY], np.float64)
            pooled = float(covid.sum() + other.sum() > 0)
            parts += [covid, other, np.array([pooled])]
        vector = np.concatenate(parts) if parts else np.zeros(0)
        if vector.size != self.length:
            raise ValueError("the input does not fit the instruction's layout")
        return vector

    def decode(self, total: np.ndarray) -> SecureSum:
        """The aggregate a summed input ``total`` (reals) stands for."""
        if total.size != self.length:
            raise ValueError(f"a sum of {total.size} entries, the layout has {self.length}")
        at = self.weights_size
        raw = total[at : at + len(self.counts)]
        # Counts enter the field exactly, so their sum is whole; a sum that is not was not
        # unmasked right (a site or the coordinator left the protocol).
        if raw.size and (np.max(np.abs(raw - np.rint(raw))) > 1e-6 or np.min(raw) < 0):
            raise ValueError("its counts are not whole non-negative numbers")
        counts = dict(zip(self.counts, np.rint(raw), strict=True))
        metrics: dict[str, float] = {key: float(value) for key, value in counts.items()}
        at += len(self.counts)
        for key, _ in self.averaged:
            weighted, weight = total[at], total[at + 1]
            metrics[key] = float(weighted / weight) if weight > 0.5 else math.nan
            at += 2
        histograms, sites = None, 0
        if self.histogram_bins:
            bins = self.histogram_bins
            covid = np.rint(total[at : at + bins]).astype(np.int64)
            other = np.rint(total[at + bins : at + 2 * bins]).astype(np.int64)
            histograms, sites = (covid, other), int(round(total[at + 2 * bins]))
        update: dict[str, np.ndarray] = {}
        if self.weights:
            weight = metrics[WEIGHT_KEY]
            if weight < 1:
                raise ValueError("a train sum without examples")
            at = 0
            for name, shape in self.weights:
                size = math.prod(shape)
                update[name] = (total[at : at + size] / weight).reshape(shape)
                at += size
        return SecureSum(update, metrics, histograms, sites)
