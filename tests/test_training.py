"""Tests of local training, evaluation and device choice on tiny backbones and toy scans."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedct.common.cache.dataset import Batch
from fedct.common.model.classifier import ModelConfig, SliceClassifier, bn_state_keys, build_model
from fedct.common.training.device import DeviceError, autocast_context, pick_device
from fedct.common.training.loop import TrainConfig, balanced_class_weights, evaluate, train_local

CPU = TrainConfig(device="cpu", class_weighting="none")


def tiny_model(seed: int = 0, **options: object) -> SliceClassifier:
    torch.manual_seed(seed)
    return build_model(ModelConfig(backbone="test_efficientnet", **options))


def brightness_batches(n_batches: int = 3, per_batch: int = 6, seed: int = 0) -> list[Batch]:
    """Scans whose class is their brightness (dark, mid, bright), with 2 to 4 slices each."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for b in range(n_batches):
        y = torch.arange(per_batch) % 3
        slices = torch.randint(2, 5, (per_batch,), generator=generator)
        x = torch.zeros(per_batch, 4, 1, 32, 32)
        mask = torch.arange(4)[None, :] < slices[:, None]
        level = 0.2 + 0.3 * y.float()
        noise = 0.05 * torch.randn(per_batch, 4, 1, 32, 32, generator=generator)
        x[mask] = (level[:, None, None, None, None] + noise)[mask]
        ids = [f"scan{b}-{i}" for i in range(per_batch)]
        batches.append(Batch(x, mask, y, ids, [f"patient{b}-{i}" for i in range(per_batch)]))
    return batches


def distance(model: SliceClassifier, reference: dict[str, torch.Tensor]) -> float:
    return sum(
        float((p.detach() - reference[name]).pow(2).sum())
        for name, p in model.named_parameters()
        if p.requires_grad
    )


def test_training_lowers_the_loss() -> None:
    model = tiny_model()
    data = brightness_batches()
    before = evaluate(model, data, "cpu").loss
    cfg = dataclasses.replace(CPU, lr=1e-2, local_epochs=4)
    result = train_local(model, data, cfg)
    after = evaluate(model, data, "cpu").loss
    assert after < 0.7 * before
    assert result.num_examples == 4 * 18
    assert 0.0 <= result.accuracy <= 1.0 and result.seconds > 0


def test_training_is_deterministic_on_cpu() -> None:
    data = brightness_batches(n_batches=2)
    states = []
    for _ in range(2):
        model = tiny_model(dropout=0.5)
        train_local(model, data, dataclasses.replace(CPU, seed=3))
        states.append(model.state_dict())
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


def test_fedprox_keeps_weights_closer_to_global() -> None:
    data = brightness_batches()
    start = tiny_model()
    global_state = {k: v.clone() for k, v in start.state_dict().items()}
    distances = {}
    for mu in (0.0, 5.0):
        model = tiny_model()
        model.load_state_dict(global_state)
        cfg = dataclasses.replace(CPU, optimizer="sgd", momentum=0.0, lr=0.05, proximal_mu=mu)
        train_local(
            model, data, dataclasses.replace(cfg, local_epochs=2), global_state=global_state
        )
        distances[mu] = distance(model, global_state)
    assert 0 < distances[5.0] < 0.8 * distances[0.0]


def test_fedprox_requires_every_trainable_parameter() -> None:
    model = tiny_model()
    cfg = dataclasses.replace(CPU, proximal_mu=0.1)
    with pytest.raises(KeyError, match="global_state lacks trainable parameters"):
        train_local(model, brightness_batches(1), cfg, global_state={"head.bias": torch.zeros(3)})


def test_frozen_backbone_moves_only_the_head() -> None:
    model = tiny_model(freeze_backbone=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_local(model, brightness_batches(), dataclasses.replace(CPU, lr=1e-2))
    after = model.state_dict()
    assert bn_state_keys(model)
    for key in before:
        changed = not torch.equal(before[key], after[key])
        assert changed == key.startswith("head."), key


def test_gradient_clipping_bounds_each_step() -> None:
    model = tiny_model()
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    cfg = dataclasses.replace(
        CPU, optimizer="sgd", momentum=0.0, weight_decay=0.0, lr=1.0, max_grad_norm=1e-3
    )
    train_local(model, brightness_batches(n_batches=1), cfg)
    assert 0 < distance(model, start) ** 0.5 <= 1e-3 * (1 + 1e-4)


def test_balanced_weighting() -> None:
    torch.testing.assert_close(balanced_class_weights([1, 3, 0]), torch.tensor([4 / 3, 4 / 9, 0.0]))
    model = tiny_model()
    balanced = dataclasses.replace(CPU, class_weighting="balanced")
    with pytest.raises(ValueError, match="class_counts"):
        train_local(model, brightness_batches(1), balanced)
    result = train_local(model, brightness_batches(1), balanced, class_counts=[2, 2, 2])
    assert np.isfinite(result.loss)


def test_evaluate_matches_a_hand_computation() -> None:
    model = tiny_model()
    data = brightness_batches(n_batches=2, per_batch=3)
    result = evaluate(model, data, "cpu")
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(b.x, b.mask) for b in data]).double()
    labels = torch.cat([b.y for b in data])
    assert result.loss == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-6)
    assert result.probs.shape == (6, 3) and result.probs.dtype == np.float64
    np.testing.assert_allclose(result.probs.sum(axis=1), 1.0)
    np.testing.assert_array_equal(result.labels, labels.numpy())
    assert result.scan_ids == [s for b in data for s in b.scan_ids]
    assert result.patient_ids == [p for b in data for p in b.patient_ids]
    assert result.num_examples == 6


def test_empty_loaders_are_rejected() -> None:
    with pytest.raises(ValueError, match="no scans"):
        evaluate(tiny_model(), [], "cpu")
    with pytest.raises(ValueError, match="no scans"):
        train_local(tiny_model(), [], CPU)


def test_train_config_rejects_bad_options() -> None:
    with pytest.raises(ValueError):
        TrainConfig(optimizer="adam")
    with pytest.raises(ValueError):
        TrainConfig(class_weighting="inverse")
    with pytest.raises(ValueError):
        TrainConfig(max_grad_norm=0.0)


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device().type == expected
    with pytest.raises(DeviceError, match="cuda:99"):
        pick_device("cuda:99")
    with pytest.raises(DeviceError, match="tpu"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="not available"):
            pick_device("cuda")


def test_no_autocast_on_cpu() -> None:
    with autocast_context(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
