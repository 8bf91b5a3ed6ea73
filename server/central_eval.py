"""Central evaluation of the global model on external caches held by the coordinator.

Every scan of each external cache is scored (its splits do not matter here).  Metrics per
set, named ``<set>-<metric>``: ``auc_covid`` (COVID-19 vs rest; a binary normal-vs-COVID-19
set such as MosMedData maps onto it), ``sens_covid`` and ``spec_covid`` at a COVID-19
probability of 0.5, ``accuracy`` (3-class), ``loss`` (cross entropy), ``n``, and the AUC's
95 % patient-bootstrap interval ``auc_covid_ci_low`` / ``auc_covid_ci_high`` (1000 resamples,
seed 0: cheap next to scoring the scans, and what a reader of the round table needs to judge a
difference between rounds).  Patients are resampled in the order of their pixels' digests, as
``fedct evaluate`` does, so the interval does not depend on the cache's pseudonym salt.
"""

from __future__ import annotations

from logging import INFO
from pathlib import Path

from flwr.common import log

from common.bootstrap import auc_interval
from common.cache import CacheDataset, make_loader, patient_content_keys
from common.metrics import summarize
from common.training import evaluate
from server.global_model import GlobalModel
from server.settings import ServerSettings


class CentralEvaluator:
    """Scores the global model on named external caches; no caches, no metrics."""

    def __init__(
        self, model: GlobalModel, caches: dict[str, Path], *, batch_size: int, device: str
    ) -> None:
        self.model = model
        self.device = device
        datasets = {name: CacheDataset(path) for name, path in caches.items()}
        self.loaders = {name: make_loader(data, batch_size) for name, data in datasets.items()}
        self.patient_keys = {
            name: patient_content_keys(data.cache_dir, data.rows) for name, data in datasets.items()
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

    def __call__(self) -> dict[str, float]:
        """Score the global model's current weights on every external set."""
        metrics: dict[str, float] = {}
        for name, loader in self.loaders.items():
            result = evaluate(self.model.model, loader, self.device)
            summary = summarize(result.labels, result.probs)
            metrics.update({f"{name}-{key}": value for key, value in summary.items()})
            metrics[f"{name}-loss"] = result.loss
            keys = self.patient_keys[name]
            boot_ids = [keys[patient] for patient in result.patient_ids]
            low, high = auc_interval(result.labels, result.probs, boot_ids, n_boot=1000)
            metrics.update({f"{name}-auc_covid_ci_low": low, f"{name}-auc_covid_ci_high": high})
            log(
                INFO,
                "central evaluation %s: %d scans, loss %.4f, AUC %.3f (95 %% CI %.3f–%.3f)",
                name,
                result.num_examples,
                result.loss,
                summary["auc_covid"],
                low,
                high,
            )
        return metrics
