"""The federated operating point: each round, the sites' tune-split histograms of p(COVID-19)
are summed and the COVID-19 threshold is chosen on the pool (common/operating_point_hist.py).

The histograms arrive as list metrics of the evaluate replies.  fedct's metric aggregation
averages numbers, so they are taken out of every reply before the strategy aggregates.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

import numpy as np
from flwr.app import Message
from flwr.common import log

from common.operating_point import OperatingPoint
from common.operating_point_hist import COVID_KEY, OTHER_KEY, choose_from_histograms


def _take_histograms(reply: Message) -> tuple[np.ndarray, np.ndarray] | None:
    """Remove the reply's histograms from its metrics and return them (None if it has none)."""
    metrics = next(iter(reply.content.metric_records.values()))
    covid, other = metrics.pop(COVID_KEY, None), metrics.pop(OTHER_KEY, None)
    if covid is None or other is None:
        return None
    return np.asarray(covid, np.int64), np.asarray(other, np.int64)


def federated_operating_point(
    replies: Iterable[Message], rule: str, min_specificity: float
) -> OperatingPoint | None:
    """The operating point chosen by ``rule`` on the summed histograms of the successful
    evaluate ``replies``, which lose their histogram metrics.  None, with a warning, when no
    reply holds histograms or the pooled tune splits lack COVID-19 or other scans."""
    pooled = [h for reply in replies if (h := _take_histograms(reply)) is not None]
    if not pooled:
        log(WARNING, "operating point not chosen: no site sent tune histograms")
        return None
    sites = sum(int(covid.sum() + other.sum()) > 0 for covid, other in pooled)
    try:
        # ValueError when the sites' bins differ, or the pool lacks a class.
        covid = np.sum([pair[0] for pair in pooled], axis=0, dtype=np.int64)
        other = np.sum([pair[1] for pair in pooled], axis=0, dtype=np.int64)
        scans = int(covid.sum() + other.sum())
        chosen_on = f"pooled tune splits of {sites} site{'s' * (sites != 1)}, {scans} scans"
        return choose_from_histograms(
            covid, other, rule, min_specificity=min_specificity, chosen_on=chosen_on
        )
    except ValueError as exc:
        log(WARNING, "operating point not chosen: %s", exc)
        return None
