"""Flower built-in strategies chosen by the run config, with fedct's metric aggregation.

``fedavg``, ``fedprox`` and ``fedadam`` are Flower's FedAvg, FedProx and FedAdam.  ``fedbn``
is FedAvg on the server: every site receives the averaged model but overwrites its BatchNorm
weights, biases and running statistics with its own before training and evaluating (see
client/fedbn.py), so the averaged BatchNorm entries serve only the central evaluation and the
checkpoints.  FedAdam takes an Adam step on the parameters only: BatchNorm running statistics
are not parameters, and an Adam step of fixed size can drive a running variance negative, so
they are replaced by the plain weighted average of the sites' statistics.

The robust strategies, for federations that let the coordinator see every site's update and
fear that some sites send poisoned ones, are Flower's, with ``malicious-sites`` (f) as the
number of sites they are built to withstand:

* ``fedmedian`` (Yin et al. 2018): the coordinate-wise median of the sites' weights; withstands
  any f < n/2 (a majority of honest sites), whatever f is set to; ignores ``num-examples``;
* ``fedtrimmedavg`` (Yin et al. 2018): per coordinate, the f largest and f smallest values are
  dropped and the rest averaged (unweighted); withstands f malicious sites if n > 2f
  (with fewer sites it trims (n - 1) // 2 and says so);
* ``krum`` (Blanchard et al. 2017): the one site's weights closest to their n - f - 2 nearest
  others; its guarantee needs n >= 2f + 3;
* ``multikrum``: the n - f sites Krum scores best, averaged by ``num-examples``; the same
  assumption.

Each strategy's round logs a warning when the sites that replied are too few for its
assumption.  None of them can run with secure aggregation (the coordinator sees only the sum).
BatchNorm statistics and batch counts go through the same robust rule as the weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from logging import WARNING
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    MultiKrum,
    Strategy,
)

from fedct.common.federation.messages import WEIGHT_KEY
from fedct.common.federation.secure_vector import SITE_ONLY_SUFFIXES, is_count, weight_key_of

ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum", "multikrum")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedbn", *ROBUST_STRATEGIES)


def _metrics_of(content: RecordDict) -> MetricRecord:
    return next(iter(content.metric_records.values()))


def aggregate_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted means of the replies' metrics that skip non-finite values; counts are summed.

    A metric ``<split>-<name>`` is weighted by ``<split>-n`` when the replies carry that count
    (evaluation replies report several splits of different sizes), any other metric by
    ``weight_key`` (common/federation/secure_vector.py's rule, which secure aggregation
    follows too).  ``weight_key`` and the ``*-n`` counts are summed.  A metric that is not
    finite at any site (an AUC where no site has both classes) aggregates to NaN.  A site's
    confidence bounds (``*_low``, ``*_high``) are left out: a mean of bounds is no interval.
    """
    metrics = [_metrics_of(record) for record in records]
    out = MetricRecord()
    for key in metrics[0]:
        if key.endswith(SITE_ONLY_SUFFIXES):
            continue
        values = [float(cast(float, m[key])) for m in metrics]
        if is_count(key, weight_key):
            out[key] = sum(values)
            continue
        count_key = weight_key_of(key, metrics[0], weight_key)
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


def _replied(replies: list[Message]) -> int:
    return sum(not reply.has_error() for reply in replies)


def _short_of(strategy: str, sites: int, needed: int, malicious: int) -> None:
    if sites < needed:
        log(
            WARNING,
            "%s: %d sites replied; withstanding %d malicious site(s) needs %d",
            strategy,
            sites,
            malicious,
            needed,
        )


class TrimmedMean(FedTrimmedAvg):
    """Flower's FedTrimmedAvg trimming exactly ``malicious_sites`` values at each end of every
    coordinate, however many sites replied (at most (n - 1) // 2)."""

    def __init__(self, *, malicious_sites: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.malicious_sites = malicious_sites

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        sites = _replied(replies)
        _short_of("fedtrimmedavg", sites, 2 * self.malicious_sites + 1, self.malicious_sites)
        cut = min(self.malicious_sites, (sites - 1) // 2) if sites else 0
        # Flower cuts int(beta * n) values at each end.
        self.beta = cut / sites + 1e-9 if sites else 0.0
        return super().aggregate_train(server_round, replies)


class SelectingKrum(MultiKrum):
    """Flower's MultiKrum with f = ``malicious_sites``, averaging the n - f best-scored sites
    (``multi``) or only the best one (Krum)."""

    def __init__(self, *, malicious_sites: int, multi: bool, **kwargs: Any) -> None:
        super().__init__(num_malicious_nodes=malicious_sites, **kwargs)
        self.multi = multi

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        sites, malicious = _replied(replies), self.num_malicious_nodes
        _short_of("multikrum" if self.multi else "krum", sites, 2 * malicious + 3, malicious)
        self.num_nodes_to_select = max(1, sites - malicious) if self.multi else 1
        return super().aggregate_train(server_round, replies)


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
    malicious_sites: int = 1,
) -> FedAvg:
    """The strategy called ``name`` (one of :data:`STRATEGIES`); ``malicious_sites`` is the
    robust strategies' f."""
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
    if name == "fedmedian":
        return FedMedian(**common)
    if name == "fedtrimmedavg":
        return TrimmedMean(**common, malicious_sites=malicious_sites)
    if name in ("krum", "multikrum"):
        return SelectingKrum(**common, malicious_sites=malicious_sites, multi=name == "multikrum")
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
