"""Privacy accounting of patient-level DP-SGD with opacus' accountants (RDP or PRV).

A :class:`PrivacyLedger` is an accountant's history: ``(noise multiplier σ, sample rate q,
steps)`` entries in the order they were spent, merged as opacus merges them.  It is plain
data, so a site can keep it in a JSON file between rounds (the ClientApp is re-created every
round) and any accountant can analyse it: the same history fed to opacus' ``RDPAccountant``
or ``PRVAccountant`` gives the same ε.  opacus is imported only when ε or σ is computed (a
run without DP never imports it), and never configures the root logger.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedct.common.console import import_quietly

ACCOUNTANTS = ("rdp", "prv")
Entry = tuple[float, float, int]


class LedgerError(ValueError):
    """A stored privacy ledger is unreadable or holds impossible entries."""


def check_accountant(name: str) -> str:
    """``name`` if it is an accountant fedct supports; ValueError otherwise."""
    if name not in ACCOUNTANTS:
        raise ValueError(f"dp-accountant must be one of {', '.join(ACCOUNTANTS)}, got {name!r}")
    return name


@dataclass(frozen=True)
class PrivacyLedger:
    """The Poisson-subsampled Gaussian steps spent so far, analysed by ``accountant``."""

    accountant: str = "rdp"
    history: tuple[Entry, ...] = ()

    def __post_init__(self) -> None:
        check_accountant(self.accountant)
        for sigma, rate, steps in self.history:
            if not (sigma > 0 and 0 < rate <= 1 and steps >= 1):
                raise LedgerError(f"impossible ledger entry (σ={sigma}, q={rate}, steps={steps})")

    @property
    def steps(self) -> int:
        return sum(steps for _, _, steps in self.history)

    def spend(self, noise_multiplier: float, sample_rate: float, steps: int) -> PrivacyLedger:
        """This ledger after ``steps`` more steps at (σ, q); equal consecutive entries merge."""
        history = list(self.history)
        if history and history[-1][:2] == (noise_multiplier, sample_rate):
            history[-1] = (noise_multiplier, sample_rate, history[-1][2] + steps)
        else:
            history.append((noise_multiplier, sample_rate, steps))
        return PrivacyLedger(self.accountant, tuple(history))

    def combined(self, other: PrivacyLedger) -> PrivacyLedger:
        """Both ledgers' steps, analysed by this ledger's accountant (sequential composition)."""
        ledger = self
        for entry in other.history:
            ledger = ledger.spend(*entry)
        return ledger

    def epsilon(self, delta: float) -> float:
        """ε of the (ε, δ) guarantee after every step of the ledger (0 before any step)."""
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if not self.history:
            return 0.0
        accountants = import_quietly("opacus.accountants")
        accountant = accountants.create_accountant(mechanism=self.accountant)
        accountant.history = [tuple(entry) for entry in self.history]
        # opacus warns when the best RDP order is the largest one tried, and PRV's
        # discretisation takes log(0) at q = 1; the bounds returned stay valid upper bounds.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (UserWarning, RuntimeWarning))
            return float(accountant.get_epsilon(delta=delta))

    def to_json(self) -> dict[str, Any]:
        return {"accountant": self.accountant, "history": [list(e) for e in self.history]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PrivacyLedger:
        try:
            history = tuple(
                (float(sigma), float(rate), int(steps)) for sigma, rate, steps in data["history"]
            )
            return cls(str(data["accountant"]), history)
        except (KeyError, TypeError, ValueError) as exc:
            raise LedgerError(f"not a privacy ledger ({exc})") from exc


def noise_for_target(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """The smallest σ (to opacus' search tolerance of 0.01 in ε) with which ``steps`` steps at
    sample rate ``sample_rate`` stay within (``target_epsilon``, ``delta``)."""
    check_accountant(accountant)
    utils = import_quietly("opacus.accountants.utils")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (UserWarning, RuntimeWarning))
        try:
            return float(
                utils.get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=accountant,
                )
            )
        except ValueError as exc:
            raise ValueError(
                f"no noise multiplier reaches ε = {target_epsilon} at δ = {delta:.3g} "
                f"over {steps} steps at sample rate {sample_rate:.3g} ({exc})"
            ) from exc
