"""Patient-level DP at a hospital: the round's DP-SGD, the site's privacy ledger, its ε budget.

The ledger (``dp-ledger.json`` in the site's state dir) holds, per run key, the accountant
history the site has spent on its train split.  The ClientApp is re-created every round, so
this file carries the accountant from round to round and across a resumed run.  A round is
charged *before* the data are touched: a crash mid-round over-counts, never under-counts.

The site's budget (node config ``dp-epsilon-budget``) bounds ε over *all* runs in the ledger
(their steps compose), at this run's δ.  A site that would exceed it declines to train: the
handler raises, Flower sends the reason back as an error reply, the coordinator logs it and
the round goes on without the site.  A site with a budget also declines runs without DP.

The reply carries ``dp-epsilon`` (this run's ε after the round) and ``dp-delta``; the train
loss and accuracy, exact statistics of the private train split, are withheld (NaN).
"""

from __future__ import annotations

import json
import math
from logging import INFO
from pathlib import Path

from flwr.app import ConfigRecord
from flwr.common import log

from fedct.client.site_data import Site
from fedct.common.cache.dataset import CacheDataset
from fedct.common.cache.store import atomic_open
from fedct.common.model.classifier import SliceClassifier
from fedct.common.training.accounting import LedgerError, PrivacyLedger
from fedct.common.training.loop import TrainConfig, TrainResult
from fedct.common.training.privacy import DPSettings, check_private_training, train_private

LEDGER_FILE = "dp-ledger.json"


class PrivacyBudgetExceeded(RuntimeError):
    """The site declines to train: the round would take it past its ε budget."""


def dp_enabled(config: ConfigRecord) -> bool:
    """Whether the coordinator asks for DP training (a run-wide switch)."""
    return bool(config.get("dp", False))


def ledger_path(state_dir: Path) -> Path:
    return Path(state_dir) / LEDGER_FILE


def read_ledgers(state_dir: Path) -> dict[str, PrivacyLedger]:
    """The site's ledger of every run key; empty before its first DP round."""
    path = ledger_path(state_dir)
    if not path.exists():
        return {}
    try:
        runs = json.loads(path.read_text())
        return {str(key): PrivacyLedger.from_json(value) for key, value in runs.items()}
    except (OSError, json.JSONDecodeError, AttributeError, LedgerError) as exc:
        raise LedgerError(
            f"{path}: unreadable privacy ledger ({exc}); the site cannot tell how much privacy "
            "it has spent, so it trains no more until the file is repaired"
        ) from exc


def write_ledgers(state_dir: Path, ledgers: dict[str, PrivacyLedger]) -> None:
    with atomic_open(ledger_path(state_dir)) as handle:
        json.dump({key: ledger.to_json() for key, ledger in ledgers.items()}, handle, indent=2)


def decline_without_dp(site: Site) -> None:
    """A site with an ε budget does not train without DP (ε would be infinite)."""
    if site.epsilon_budget is not None:
        raise PrivacyBudgetExceeded(
            f"site {site.name} declines: the run trains without DP (ε = ∞) and the site has "
            f"an ε budget of {site.epsilon_budget:g}"
        )


def train_site_private(
    site: Site,
    model: SliceClassifier,
    data: CacheDataset,
    train_cfg: TrainConfig,
    config: ConfigRecord,
) -> tuple[TrainResult, dict[str, float]]:
    """One round of patient-level DP-SGD on the site's train split ``data``, charged to the
    ledger once the settings are known to be usable.  Returns the training result and the
    metrics the reply carries instead of the plain ones; raises
    :class:`PrivacyBudgetExceeded` before training when the round would take the site past
    its budget."""
    check_private_training(model, train_cfg)
    settings = DPSettings.from_config(config)
    patients = [row["patient_id"] for row in data.rows]
    plan = settings.plan(len(set(patients)), train_cfg.batch_size, train_cfg.local_epochs)
    run_key = str(config["run-key"])
    ledgers = read_ledgers(site.state_dir)
    previous = ledgers[run_key].history if run_key in ledgers else ()
    run = PrivacyLedger(settings.accountant, previous).spend(
        plan.noise_multiplier, plan.sample_rate, plan.steps
    )
    site_total = run
    for key, ledger in ledgers.items():
        if key != run_key:
            site_total = site_total.combined(ledger)
    site_epsilon = site_total.epsilon(plan.delta)
    if site.epsilon_budget is not None and site_epsilon > site.epsilon_budget:
        raise PrivacyBudgetExceeded(
            f"site {site.name} declines: ε would reach {site_epsilon:.2f} > budget "
            f"{site.epsilon_budget:g} (δ = {plan.delta:.2g}, all DP runs on this site)"
        )
    write_ledgers(site.state_dir, {**ledgers, run_key: run})
    epsilon = run.epsilon(plan.delta)
    result = train_private(model, data, patients, train_cfg, plan)
    log(
        INFO,
        "site %s: DP-SGD σ %.3f, q %.3f, C %g, %d steps; ε %.2f this run, %.2f all runs (δ %.2g)",
        site.name,
        plan.noise_multiplier,
        plan.sample_rate,
        plan.max_grad_norm,
        plan.steps,
        epsilon,
        site_epsilon,
        plan.delta,
    )
    metrics = {
        "train-loss": math.nan,
        "train-accuracy": math.nan,
        "dp-epsilon": epsilon,
        "dp-delta": plan.delta,
    }
    return result, metrics
