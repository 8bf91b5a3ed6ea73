"""Central evaluation of the global model on external caches held by the coordinator.

Every scan of each external cache is scored (its splits do not matter here).  Metrics per
set, named ``<set>-<metric>``: ``auc_covid`` (COVID-19 vs rest; a binary normal-vs-COVID-19
set such as MosMedData maps onto it), ``sens_covid`` and ``spec_covid`` at the round's
federated operating point with its ``threshold`` (without one — round 0, or a round whose
pooled tune splits could not choose one — ``sens_covid_at_0.5`` and ``spec_covid_at_0.5``),
``accuracy`` (3-class), ``loss`` (cross entropy), ``n``, and the AUC's
95 % patient-bootstrap interval ``auc_covid_ci_low`` / ``auc_covid_ci_high`` (1000 resamples,
seed 0: cheap next to scoring the scans, and what a reader of the round table needs to judge a
difference between rounds).  Patients are resampled in the order of their pixels' digests, as
``fedct evaluate`` does, so the interval does not depend on the cache's pseudonym salt.
"""

from __future__ import annotations

from logging import INFO
from pathlib import Path

from flwr.common import log

from fedct.common.cache.dataset import CacheDataset
from fedct.common.cache.store import patient_content_keys
from fedct.common.metrics.operating_point import OperatingPoint
from fedct.common.training.loop import score_split
from fedct.server.global_model import GlobalModel
from fedct.server.settings import ServerSettings

CI_LOW, CI_HIGH = "auc_covid_ci_low", "auc_covid_ci_high"  # the external AUC's 95 % CI


class CentralEvaluator:
    """Scores the global model on named external caches; no caches, no metrics."""

    def __init__(
        self, model: GlobalModel, caches: dict[str, Path], *, batch_size: int, device: str
    ) -> None:
        self.model = model
        self.device = device
        self.batch_size = batch_size
        self.datasets = {name: CacheDataset(path) for name, path in caches.items()}
        self.patient_keys = {
            name: patient_content_keys(data.cache_dir, data.rows)
            for name, data in self.datasets.items()
        }

    @classmethod
    def for_run(cls, model: GlobalModel, settings: ServerSettings) -> CentralEvaluator:
        """The evaluator of a run: its external caches, batch size and device."""
        return cls(
            model,
            settings.external_caches,
            batch_size=settings.training.batch_size,
            device=settings.device,
        )

    def __call__(self, operating_point: OperatingPoint | None = None) -> dict[str, float]:
        """Score the global model's current weights on every external set, sensitivity and
        specificity at ``operating_point`` (the round's, chosen on the sites' tune splits)."""
        metrics: dict[str, float] = {}
        for name, data in self.datasets.items():
            scores, _ = score_split(
                self.model.model,
                data,
                name,
                batch_size=self.batch_size,
                device=self.device,
                interval=(CI_LOW, CI_HIGH),
                boot_keys=self.patient_keys[name],
                n_boot=1000,
                threshold=None if operating_point is None else operating_point.threshold,
            )
            metrics.update(scores)
            log(
                INFO,
                "central evaluation %s: %d scans, loss %.4f, AUC %.3f (95 %% CI %.3f–%.3f)",
                name,
                scores[f"{name}-n"],
                scores[f"{name}-loss"],
                scores[f"{name}-auc_covid"],
                scores[f"{name}-{CI_LOW}"],
                scores[f"{name}-{CI_HIGH}"],
            )
        return metrics
