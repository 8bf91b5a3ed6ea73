"""Mixed precision as asked: ``amp`` of common/training/device.py, TrainConfig and evaluate."""

from __future__ import annotations

import pytest
import torch

from fedct.common.training.device import amp_dtype, autocast_context
from fedct.common.training.loop import TrainConfig, evaluate, train_local
from tests.test_training import brightness_batches, tiny_model

CPU = torch.device("cpu")


def test_amp_modes_on_the_cpu() -> None:
    assert amp_dtype(CPU) is None  # auto: full precision on the CPU
    assert amp_dtype(CPU, "off") is None
    assert amp_dtype(CPU, "bf16") == torch.bfloat16
    assert amp_dtype(CPU, "fp16") == torch.float16
    with pytest.raises(ValueError, match="amp must be one of"):
        amp_dtype(CPU, "fp8")
    with pytest.raises(ValueError, match="amp must be one of"):
        TrainConfig(amp="fp8")


def test_bf16_autocast_on_the_cpu_when_asked() -> None:
    with autocast_context(CPU, "bf16"):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast_context(CPU):
        assert not torch.is_autocast_enabled("cpu")


def test_training_and_evaluation_run_in_bf16_on_the_cpu() -> None:
    model = tiny_model()
    batches = brightness_batches(n_batches=2)
    cfg = TrainConfig(device="cpu", amp="bf16", class_weighting="none")
    result = train_local(model, batches, cfg)
    assert result.num_examples == sum(len(b.y) for b in batches)
    scored = evaluate(model, batches, "cpu", amp="bf16")
    assert scored.probs.shape == (result.num_examples, model.cfg.num_classes)
