"""Patient-level DP at a hospital: the round's DP-SGD, the site's privacy ledger, its ε budget.

The ledger (``dp-ledger.json`` in the site's state dir) holds, per run key, the accountant
history the site has spent on its train split.  The ClientApp is re-created every round, so
this file carries the accountant from round to round and across a resumed run.  A round is
charged *before* the data are touched: a crash mid-round over-counts, never under-counts.

The site's budget (node config ``dp-epsilon-budget``) bounds ε over *all* runs in the ledger
(their steps compose), at the **site's** δ (node config ``dp-delta``, default 0.1 / the site's
patients; client/site_policy.py), whatever δ the coordinator sends: a run's δ larger than the
site's is refused, a smaller one is used for the run's own ε.  A site that would exceed its
budget declines to train with a fixed reason (``privacy: …``), the coordinator logs it and the
round goes on without the site.  A site with a budget also declines runs without DP.  An ε
that is not a finite, non-negative number (from a degenerate accountant input) counts as over
every budget.

The ledger names each run by the hash of its run key (``Instruction.state_name``), never by
the key itself.  The reply carries ``dp-epsilon`` (this run's ε after the round) and
``dp-delta``; the train loss and accuracy, exact statistics of the private train split, are
withheld (NaN).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from logging import INFO
from pathlib import Path

from flwr.common import log

from fedct.client.site_data import Site
from fedct.client.site_policy import SitePolicy
from fedct.common.cache.dataset import CacheDataset
from fedct.common.cache.store import atomic_open
from fedct.common.federation.messages import TrainInstruction
from fedct.common.federation.site_error import PolicyError, PrivacyRefusal, number
from fedct.common.model.classifier import SliceClassifier
from fedct.common.training.accounting import LedgerError, PrivacyLedger
from fedct.common.training.loop import TrainConfig, TrainResult
from fedct.common.training.privacy import (
    DELTA_PER_PATIENT,
    check_private_training,
    train_private,
)

LEDGER_FILE = "dp-ledger.json"


class PrivacyBudgetExceeded(PrivacyRefusal):
    """The site declines to train: the round would take it past its ε budget, or the run
    trains without DP at a site that has one."""


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
        log(INFO, "site %s declines a run without DP: it has an ε budget", site.name)
        raise PrivacyBudgetExceeded("the site trains only with DP (it has an epsilon budget)")


def site_delta(policy: SitePolicy, n_patients: int) -> float:
    """The site's δ: its policy's, else 0.1 / its patients."""
    return policy.dp_delta or DELTA_PER_PATIENT / n_patients


def checked_epsilon(ledger: PrivacyLedger, delta: float) -> float:
    """ε of ``ledger`` at ``delta``; a value that is not finite and non-negative counts as
    over every budget."""
    epsilon = ledger.epsilon(delta)
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise PrivacyBudgetExceeded("epsilon is not a finite, non-negative number")
    return epsilon


def train_site_private(
    site: Site,
    model: SliceClassifier,
    data: CacheDataset,
    train_cfg: TrainConfig,
    instruction: TrainInstruction,
    policy: SitePolicy,
) -> tuple[TrainResult, dict[str, float]]:
    """One round of patient-level DP-SGD on the site's train split ``data``, charged to the
    ledger once the settings are known to be usable.  Returns the training result and the
    metrics the reply carries instead of the plain ones; raises
    :class:`PrivacyBudgetExceeded` before training when the round would take the site past
    its budget at its own δ, and PolicyError for a run δ above the site's."""
    check_private_training(model, train_cfg)
    patients = [row["patient_id"] for row in data.rows]
    own_delta = site_delta(policy, len(set(patients)))
    settings = instruction.privacy
    if settings.delta > own_delta:
        raise PolicyError(f"dp-delta {number(settings.delta)} is above the site's delta")
    settings = replace(settings, delta=settings.delta or own_delta)
    try:
        plan = settings.plan(len(set(patients)), train_cfg.batch_size, train_cfg.local_epochs)
    except ValueError as exc:
        log(INFO, "site %s: DP-SGD cannot run with the run's DP keys: %s", site.name, exc)
        raise PrivacyRefusal("DP-SGD cannot run with the message's DP keys") from None
    if plan.steps > train_cfg.local_epochs * len(set(patients)):
        # A sample rate below 1 / patients asks for more steps than an epoch has patients.
        rate = number(settings.sample_rate)
        raise PolicyError(f"dp-sample-rate {rate} asks more steps than the site has patients")
    ledgers = read_ledgers(site.state_dir)
    run_key = instruction.state_name
    previous = ledgers[run_key].history if run_key in ledgers else ()
    run = PrivacyLedger(settings.accountant, previous).spend(
        plan.noise_multiplier, plan.sample_rate, plan.steps
    )
    site_total = run
    for key, ledger in ledgers.items():
        if key != run_key:
            site_total = site_total.combined(ledger)
    site_epsilon = checked_epsilon(site_total, own_delta)
    epsilon = checked_epsilon(run, plan.delta)
    if site.epsilon_budget is not None and site_epsilon > site.epsilon_budget:
        log(
            INFO,
            "site %s declines: ε would reach %.2f > budget %g (δ %.2g, all DP runs on this site)",
            site.name,
            site_epsilon,
            site.epsilon_budget,
            own_delta,
        )
        raise PrivacyBudgetExceeded("the round would take the site past its epsilon budget")
    write_ledgers(site.state_dir, {**ledgers, run_key: run})
    result = train_private(model, data, patients, train_cfg, plan)
    log(
        INFO,
        "site %s: DP-SGD σ %.3f, q %.3f, C %g, %d steps; ε %.2f this run (δ %.2g), "
        "%.2f all runs (site δ %.2g)",
        site.name,
        plan.noise_multiplier,
        plan.sample_rate,
        plan.max_grad_norm,
        plan.steps,
        epsilon,
        plan.delta,
        site_epsilon,
        own_delta,
    )
    metrics = {
        "train-loss": math.nan,
        "train-accuracy": math.nan,
        "dp-epsilon": epsilon,
        "dp-delta": plan.delta,
    }
    return result, metrics
