"""Flower built-in strategies chosen by the run config, with fedct's metric aggregation.

``fedavg``, ``fedprox`` and ``fedadam`` are Flower's FedAvg, FedProx and FedAdam.  ``fedbn``
is FedAvg on the server: every site receives the averaged model but overwrites its BatchNorm
weights, biases and running statistics with its own before training and evaluating (see
client/fedbn.py), so the averaged BatchNorm entries serve only the central evaluation and the
checkpoints.  FedAdam takes an Adam step on the parameters only: BatchNorm running statistics
are not parameters, and an Adam step of fixed size can drive a running variance negative, so
they are replaced by the plain weighted average of the sites' statistics.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from fedct.common.federation.messages import WEIGHT_KEY

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedbn")
SITE_ONLY_SUFFIXES = ("_low", "_high")
COUNT_SUFFIX = "-n"


def _metrics_of(content: RecordDict) -> MetricRecord:
    return next(iter(content.metric_records.values()))


def aggregate_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted means of the replies' metrics that skip non-finite values; counts are summed.

    A metric ``<split>-<name>`` is weighted by ``<split>-n`` when the replies carry that count
    (evaluation replies report several splits of different sizes), any other metric by
    ``weight_key``.  ``weight_key`` and the ``*-n`` counts are summed.  A metric that is not
    finite at any site (an AUC where no site has both classes) aggregates to NaN.  A site's
    confidence bounds (``*_low``, ``*_high``) are left out: a mean of bounds is no interval.
    """
    metrics = [_metrics_of(record) for record in records]
    out = MetricRecord()
    for key in metrics[0]:
        if key.endswith(SITE_ONLY_SUFFIXES):
            continue
        values = [float(cast(float, m[key])) for m in metrics]
        if key == weight_key or key.endswith(COUNT_SUFFIX):
            out[key] = sum(values)
            continue
        count_key = key.split("-", 1)[0] + COUNT_SUFFIX if "-" in key else weight_key
        count_key = count_key if count_key in metrics[0] else weight_key
        pairs = [
            (v, float(cast(float, m[count_key])))
            for v, m in zip(values, metrics, strict=True)
            if math.isfinite(v)
        ]
        total = sum(w for _, w in pairs)
        out[key] = sum(v * w for v, w in pairs) / total if total > 0 else math.nan
    return out


class FedAdamAveragedStatistics(FedAdam):
    """FedAdam whose non-parameter entries (``statistics_keys``) are plainly averaged."""

    def __init__(self, *, statistics_keys: Iterable[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.statistics_keys = frozenset(statistics_keys)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        contents = [reply.content for reply in replies if not reply.has_error()]
        weights = np.array([float(_metrics_of(c)[self.weighted_by_key]) for c in contents])
        weights /= weights.sum()
        for key in self.statistics_keys & set(arrays):
            stacked = np.stack([c[self.arrayrecord_key][key].numpy() for c in contents])
            arrays[key] = Array(np.tensordot(weights, stacked, axes=1))
        return arrays, metrics


def build_strategy(
    name: str,
    *,
    fraction_train: float,
    min_train_nodes: int,
    min_available_nodes: int,
    proximal_mu: float,
    server_lr: float,
    client_lr: float,
    statistics_keys: Iterable[str],
) -> FedAvg:
    """The strategy called ``name`` (one of :data:`STRATEGIES`)."""
    common = {
        "fraction_train": fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": min_train_nodes,
        "min_evaluate_nodes": min_train_nodes,
        "min_available_nodes": min_available_nodes,
        "weighted_by_key": WEIGHT_KEY,
        "train_metrics_aggr_fn": aggregate_metrics,
        "evaluate_metrics_aggr_fn": aggregate_metrics,
    }
    if name in ("fedavg", "fedbn"):
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=proximal_mu)
    if name == "fedadam":
        return FedAdamAveragedStatistics(
            **common, eta=server_lr, eta_l=client_lr, statistics_keys=statistics_keys
        )
    raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {name!r}")


# The moments of Flower's FedOpt family (FedAdam, FedYogi, FedAdagrad).
OPTIMISER_STATE = ("m_t", "v_t")


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """The server optimiser's moments (FedAdam), flattened as ``m_t/<key>``; empty otherwise."""
    state: dict[str, np.ndarray] = {}
    for name in OPTIMISER_STATE:
        for key, value in (getattr(strategy, name, None) or {}).items():
            state[f"{name}/{key}"] = np.asarray(value, order="C")
    return state


def restore_strategy_state(strategy: Strategy, state: dict[str, np.ndarray]) -> None:
    """Put moments saved by :func:`strategy_state` back into a fresh strategy."""
    if not state:
        return
    if not all(hasattr(strategy, name) for name in OPTIMISER_STATE):
        raise ValueError(
            f"the checkpoint holds server optimiser state but {type(strategy).__name__} "
            "has none; resume with the strategy the run was started with"
        )
    for name in OPTIMISER_STATE:
        prefix = f"{name}/"
        moments = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        setattr(strategy, name, moments or None)
