"""Patient-level DP-SGD: exact per-patient clipping, opacus' accounting, the site's ε budget."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import write_tiny_cache
from flwr.app import ArrayRecord
from opacus.accountants import PRVAccountant, RDPAccountant

from fedct.client.dp import PrivacyBudgetExceeded, ledger_path, read_ledgers
from fedct.client.local import train_site
from fedct.client.site_data import SiteConfigError, resolve_site
from fedct.common.cache.dataset import ScanItem
from fedct.common.cache.store import read_manifest, write_manifest
from fedct.common.federation.messages import TrainInstruction
from fedct.common.federation.transport import Layout
from fedct.common.model.classifier import (
    ModelConfig,
    SliceClassifier,
    bn_state_keys,
    build_model,
    travelling_state,
)
from fedct.common.training.accounting import PrivacyLedger
from fedct.common.training.loop import TrainConfig
from fedct.common.training.privacy import (
    DPPlan,
    DPSettings,
    PrivacyError,
    accumulate_patient,
    make_dp_optimizer,
    noisy_step,
    patient_groups,
    train_private,
)
from fedct.server.settings import ServerSettings

GN = ModelConfig(backbone="test_efficientnet_gn", slice_chunk=2)
CPU = TrainConfig(device="cpu", class_weighting="none", batch_size=2, lr=0.05, optimizer="sgd")
# Per-patient gradients from chunked, checkpointed batches vs one scan at a time: float32
# summation order only.
RTOL, ATOL = 1e-4, 1e-5  # float32 sums in another order (threads); a per-scan clip is off by 0.29


def gn_model(seed: int = 0, **options: Any) -> SliceClassifier:
    torch.manual_seed(seed)
    return build_model(replace(GN, **options))


def scans_of_patients(counts: list[int], seed: int = 0) -> tuple[list[ScanItem], list[str]]:
    """Scans of patients with ``counts[i]`` scans each (2–4 slices), interleaved in order."""
    generator = torch.Generator().manual_seed(seed)
    owners = [p for p, n in enumerate(counts) for _ in range(n)]
    order = torch.randperm(len(owners), generator=generator).tolist()
    items = []
    for k, index in enumerate(order):
        slices = int(torch.randint(2, 5, (1,), generator=generator))
        pixels = torch.rand(slices, 1, 32, 32, generator=generator)
        label = int(torch.randint(0, 3, (1,), generator=generator))
        items.append(ScanItem(pixels, label, f"scan-{k}", f"patient-{owners[index]}"))
    return items, [item.patient_id for item in items]


def plan(**overrides: Any) -> DPPlan:
    values = dict(
        noise_multiplier=1.0,
        sample_rate=0.5,
        max_grad_norm=1.0,
        steps=1,
        delta=1e-3,
        expected_batch_size=2.0,
    )
    return DPPlan(**{**values, **overrides})


def brute_force_clipped_sum(
    model: SliceClassifier, items: list[ScanItem], clip: float
) -> tuple[list[torch.Tensor], list[float]]:
    """Σ over patients of clip(Σ over the patient's scans of ∇ loss(scan)), one scan at a time
    through an unchunked copy of the model; also each patient's gradient norm."""
    reference = copy.deepcopy(model)
    reference.cfg = replace(model.cfg, slice_chunk=64)
    params = [p for p in reference.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for patient in patient_groups([item.patient_id for item in items]):
        grads = [torch.zeros_like(p) for p in params]
        for i in patient:
            item = items[i]
            x = item.pixels.unsqueeze(0)
            mask = torch.ones(1, len(item.pixels), dtype=torch.bool)
            loss = F.cross_entropy(reference(x, mask), torch.tensor([item.label]), reduction="sum")
            for g, d in zip(grads, torch.autograd.grad(loss, params), strict=True):
                g += d
        norm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
        norms.append(norm)
        factor = min(1.0, clip / (norm + 1e-6))
        for t, g in zip(total, grads, strict=True):
            t += factor * g
    return total, norms


def test_clipped_patient_gradients_equal_a_loop_over_single_patients() -> None:
    items, patients = scans_of_patients([1, 3, 2, 1, 2])
    model = gn_model().train()
    _, norms = brute_force_clipped_sum(model, items, math.inf)
    clip = sorted(norms)[len(norms) // 2]  # the median: some patients clipped, some not
    expected, _ = brute_force_clipped_sum(model, items, clip)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_dp_optimizer(params, CPU, plan(max_grad_norm=clip), torch.Generator())
    for patient in patient_groups(patients):
        accumulate_patient(model, optimizer, [items[i] for i in patient], torch.device("cpu"), 2)
    got = [p.summed_grad for p in optimizer.params]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=RTOL, atol=ATOL)
    assert min(norms) < clip < max(norms)


def test_bf16_autocast_serves_every_chunk_of_a_patient(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA path (bf16 autocast, a fresh context per chunk), exercised on the CPU."""
    items, patients = scans_of_patients([3])
    model = gn_model().train()
    expected, _ = brute_force_clipped_sum(model, items, 1.0)
    for module in ("fedct.common.training.privacy", "fedct.common.training.device"):
        monkeypatch.setattr(f"{module}.autocast_dtype", lambda device: torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_dp_optimizer(params, CPU, plan(), torch.Generator())
    accumulate_patient(model, optimizer, items, torch.device("cpu"), 1)
    got = torch.cat([p.summed_grad.flatten() for p in optimizer.params])
    want = torch.cat([e.flatten() for e in expected])
    assert float((got - want).norm() / want.norm()) < 0.2  # bf16 keeps ~3 significant digits


def test_a_step_without_patients_is_noise_alone() -> None:
    model = gn_model().train()
    before = travelling_state(model, model.cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_dp_optimizer(params, CPU, plan(), torch.Generator().manual_seed(1))
    noisy_step(model, optimizer, None, 0.0)
    after = travelling_state(model, model.cfg)
    assert all(p.grad is None and p.summed_grad is None for p in params)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_noise_comes_from_the_system_not_the_public_seed() -> None:
    items, patients = scans_of_patients([1, 2, 1, 2])
    runs = {}
    for name, seed in (("system-1", None), ("system-2", None), ("fixed-1", 5), ("fixed-2", 5)):
        model = gn_model()
        train_private(model, items, patients, CPU, plan(steps=2), seed=seed)
        runs[name] = travelling_state(model, model.cfg)

    def same(a: str, b: str) -> bool:
        return all(torch.equal(runs[a][k], runs[b][k]) for k in runs[a])

    assert same("fixed-1", "fixed-2")
    assert not same("system-1", "system-2")


@pytest.mark.parametrize(("accountant", "opacus"), [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_ledger_epsilon_equals_opacus_accountant(accountant: str, opacus: type) -> None:
    rounds = [(1.1, 0.25, 4), (1.1, 0.25, 4), (0.9, 0.2, 5)]
    ledger = PrivacyLedger(accountant)
    reference = opacus()
    for sigma, rate, steps in rounds:
        ledger = PrivacyLedger.from_json(json.loads(json.dumps(ledger.to_json())))
        ledger = ledger.spend(sigma, rate, steps)
        for _ in range(steps):
            reference.step(noise_multiplier=sigma, sample_rate=rate)
        assert ledger.epsilon(1e-3) == pytest.approx(reference.get_epsilon(delta=1e-3), rel=1e-9)
    assert ledger.history == ((1.1, 0.25, 8), (0.9, 0.2, 5))
    assert PrivacyLedger(accountant).epsilon(1e-3) == 0.0


def test_target_epsilon_is_reached_after_the_planned_rounds() -> None:
    settings = DPSettings(enabled=True, target_epsilon=2.0, rounds=3, delta=1e-3)
    round_plan = settings.plan(n_patients=20, batch_size=4, local_epochs=1)
    assert round_plan.sample_rate == 0.2 and round_plan.steps == 5
    ledger = PrivacyLedger("rdp")
    for _ in range(3):
        ledger = ledger.spend(round_plan.noise_multiplier, round_plan.sample_rate, round_plan.steps)
    assert 2.0 - 0.011 <= ledger.epsilon(1e-3) <= 2.0


def test_settings_defaults_and_errors() -> None:
    default = DPSettings(enabled=True).plan(n_patients=40, batch_size=4, local_epochs=2)
    assert default.delta == pytest.approx(0.1 / 40) and default.sample_rate == 0.1
    assert default.steps == 20 and default.expected_batch_size == pytest.approx(4.0)
    config = {**DPSettings().to_config(), "dp-accountant": "gdp"}
    with pytest.raises(PrivacyError, match="dp-accountant must be one of rdp, prv"):
        DPSettings.from_config(config)
    with pytest.raises(PrivacyError, match="dp-max-grad-norm must be a finite number"):
        DPSettings.from_config({**DPSettings().to_config(), "dp-max-grad-norm": "x"})
    with pytest.raises(PrivacyError, match="lacks the DP key"):
        DPSettings.from_config({"dp": True})


def test_models_and_losses_that_would_break_the_guarantee_are_refused() -> None:
    items, patients = scans_of_patients([1, 1])
    with pytest.raises(PrivacyError, match='norm = "group"'):
        train_private(gn_model(backbone="test_efficientnet"), items, patients, CPU, plan())
    balanced = TrainConfig(device="cpu")
    with pytest.raises(PrivacyError, match="class-weighting = none"):
        train_private(gn_model(), items, patients, balanced, plan())


def test_frozen_batchnorm_trains_privately_and_keeps_its_statistics() -> None:
    """With freeze-bn every BatchNorm is a fixed affine map: DP-SGD trains the rest and leaves
    the statistics, scale and shift exactly as they were."""
    items, patients = scans_of_patients([2, 1, 2, 1])
    model = gn_model(backbone="test_efficientnet", norm="batch", freeze_bn=True)
    frozen = bn_state_keys(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_private(model, items, patients, CPU, plan(sample_rate=1.0, steps=2), seed=1)
    after = model.state_dict()
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)
    assert not torch.equal(after["head.weight"], before["head.weight"])
    assert not torch.equal(after["backbone.conv_stem.weight"], before["backbone.conv_stem.weight"])


@pytest.fixture
def dp_site_cache(tmp_path: Path) -> Path:
    """A site whose 8 training scans belong to 5 patients (some with several scans)."""
    cache = write_tiny_cache(tmp_path / "site", {"train": {0: 3, 1: 2, 2: 3}}, seed=4)
    rows = read_manifest(cache)
    for i, row in enumerate(rows):
        row["patient_id"] = f"p{i % 5}"
    write_manifest(cache, rows)
    return cache


def dp_config(run_config: dict[str, Any], server_round: int, **dp: Any) -> TrainInstruction:
    """The train instruction of ``server_round`` of a DP run with the ``dp`` settings."""
    settings = ServerSettings.from_run_config(
        {**run_config, "backbone": "test_efficientnet_gn", "class-weighting": "none"}
    )
    record = settings.train_instruction("run-1", server_round, Layout.of(_gn_state()).fingerprint)
    record.update(DPSettings(**{"enabled": True, "rounds": 3, **dp}).to_config())
    return TrainInstruction.from_record(record)


def _gn_state() -> dict[str, torch.Tensor]:
    cfg = ModelConfig(backbone="test_efficientnet_gn")
    torch.manual_seed(0)
    return travelling_state(build_model(cfg), cfg)


def gn_arrays() -> ArrayRecord:
    state = _gn_state()
    return Layout.of(state).pack(state, "float32")


def test_site_reports_epsilon_each_round_and_keeps_its_ledger(
    dp_site_cache: Path, run_config: dict[str, Any], tmp_path: Path
) -> None:
    site = resolve_site({"data-path": str(dp_site_cache), "state-dir": str(tmp_path)}, run_config)
    reference = RDPAccountant()
    for server_round in (1, 2):
        config = dp_config(run_config, server_round, sample_rate=0.5, noise_multiplier=1.3)
        _, metrics = train_site(site, config, gn_arrays())
        for _ in range(2):  # round(1 / 0.5) Poisson steps per local epoch
            reference.step(noise_multiplier=1.3, sample_rate=0.5)
        assert metrics["dp-delta"] == pytest.approx(0.1 / 5)
        assert metrics["dp-epsilon"] == pytest.approx(reference.get_epsilon(delta=0.02))
        assert math.isnan(metrics["train-loss"]) and math.isnan(metrics["train-accuracy"])
    assert read_ledgers(tmp_path)[config.state_name].history == ((1.3, 0.5, 4),)
    stored = ledger_path(tmp_path).read_text()
    assert "p0" not in stored and "scan" not in stored


def test_site_over_its_budget_declines_before_training(
    dp_site_cache: Path, run_config: dict[str, Any], tmp_path: Path
) -> None:
    one_round = PrivacyLedger().spend(1.3, 0.5, 2).epsilon(0.02)
    two_rounds = PrivacyLedger().spend(1.3, 0.5, 4).epsilon(0.02)
    budget = (one_round + two_rounds) / 2
    node = {"data-path": str(dp_site_cache), "state-dir": str(tmp_path), "site": "H"}
    site = resolve_site({**node, "dp-epsilon-budget": budget}, run_config)
    train_site(site, dp_config(run_config, 1, sample_rate=0.5, noise_multiplier=1.3), gn_arrays())
    before = ledger_path(tmp_path).read_text()
    config = dp_config(run_config, 2, sample_rate=0.5, noise_multiplier=1.3)
    with pytest.raises(PrivacyBudgetExceeded, match="past its epsilon budget"):
        train_site(site, config, gn_arrays())
    assert ledger_path(tmp_path).read_text() == before
    without_dp = replace(config, privacy=replace(config.privacy, enabled=False))
    with pytest.raises(PrivacyBudgetExceeded, match="only with DP"):
        train_site(site, without_dp, gn_arrays())
    with pytest.raises(SiteConfigError, match="dp-epsilon-budget must be a positive number"):
        resolve_site({**node, "dp-epsilon-budget": "lots"}, run_config)
