"""Tests of the slice classifier, its travelling state, weight loading and CAM (tiny backbones)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fedct.common.model.classifier import (
    BATCH_NORMS,
    ModelConfig,
    SliceClassifier,
    bn_state_keys,
    build_model,
    load_travelling_state,
    travelling_state,
)
from fedct.common.model.weights import WeightsError

TINY = "test_efficientnet"


def tiny_model(seed: int = 0, **options: object) -> SliceClassifier:
    torch.manual_seed(seed)
    return build_model(ModelConfig(backbone=TINY, **options)).eval()


def padded_batch(counts: list[int], size: int = 32, seed: int = 1) -> tuple[torch.Tensor, ...]:
    """Random scans of ``counts`` slices; the padding holds large values, so a leak would show."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(len(counts), max(counts), 1, size, size, generator=generator)
    mask = torch.zeros(len(counts), max(counts), dtype=torch.bool)
    for i, n in enumerate(counts):
        mask[i, :n] = True
    x[~mask] = 50.0
    return x, mask


def contiguous_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_pooling_uses_only_real_slices(pool: str) -> None:
    model = tiny_model(pool=pool)
    counts = [2, 5, 3]
    x, mask = padded_batch(counts)
    with torch.no_grad():
        together = model(x, mask)
        alone = torch.cat(
            [
                model(x[i : i + 1, :n], torch.ones(1, n, dtype=torch.bool))
                for i, n in enumerate(counts)
            ]
        )
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_pool_options_differ() -> None:
    x, mask = padded_batch([4])
    mean_model = tiny_model(pool="mean")
    max_model = tiny_model(pool="max")
    max_model.load_state_dict(mean_model.state_dict())
    with torch.no_grad():
        per_slice = mean_model.slice_features(x, mask)
        torch.testing.assert_close(mean_model.features(x, mask)[0], per_slice.mean(dim=0))
        torch.testing.assert_close(max_model.features(x, mask)[0], per_slice.amax(dim=0))


def test_chunking_matches_and_padding_never_reaches_backbone() -> None:
    model = tiny_model()
    x, mask = padded_batch([3, 7, 1])
    with torch.no_grad():
        whole = model(x, mask)
    model.cfg = dataclasses.replace(model.cfg, slice_chunk=2)
    sizes: list[int] = []
    model.backbone.register_forward_hook(lambda _m, inputs, _out: sizes.append(len(inputs[0])))
    with torch.no_grad():
        chunked = model(x, mask)
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)
    assert sum(sizes) == int(mask.sum()) == 11
    assert sorted(sizes) == [1, 2, 2, 2, 2, 2]


def test_checkpointed_chunks_match_plain_chunks_in_training() -> None:
    """Several chunks with gradients are checkpointed: same gradients and BatchNorm updates as
    running the same chunks without checkpointing (each chunk counted once)."""
    model = tiny_model().train()
    model.cfg = dataclasses.replace(model.cfg, slice_chunk=3)
    reference = tiny_model().train()
    reference.load_state_dict(model.state_dict())
    x, mask = padded_batch([4, 5], size=64)
    model(x, mask).square().sum().backward()
    chunks = reference.backbone_input(x[mask]).tensor_split(3)
    per_slice = torch.cat([reference.backbone(chunk) for chunk in chunks])
    pooled = torch.stack([per_slice[:4].mean(dim=0), per_slice[4:].mean(dim=0)])
    reference.head(pooled).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, msg=key)
    assert model.backbone.bn1.num_batches_tracked.item() == 3


def test_scan_without_real_slices_is_rejected() -> None:
    x, mask = padded_batch([2, 2])
    mask[1] = False
    with pytest.raises(ValueError, match="at least one real slice"):
        tiny_model()(x, mask)


def test_frozen_backbone_travels_head_only() -> None:
    model = tiny_model(freeze_backbone=True)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
    assert set(travelling_state(model, model.cfg)) == {"head.weight", "head.bias"}
    model.train()
    assert model.head.training and not model.backbone.training
    assert not any(m.training for m in model.backbone.modules())


def test_full_state_travels_with_bn_buffers() -> None:
    model = tiny_model()
    state = travelling_state(model, model.cfg)
    assert list(state) == list(model.state_dict())
    assert bn_state_keys(model) <= set(state)
    assert all(v.device.type == "cpu" for v in state.values())
    state["head.bias"] += 1.0  # a copy: the model must not change
    assert not torch.equal(state["head.bias"], model.head.bias)


def test_round_trip_through_float64_keeps_dtypes() -> None:
    source, target = tiny_model(seed=0), tiny_model(seed=1)
    source.backbone.bn1.num_batches_tracked.fill_(7)
    averaged = {
        k: v.double().numpy() + (0.4 if k.endswith("num_batches_tracked") else 0.0)
        for k, v in travelling_state(source, source.cfg).items()
    }
    load_travelling_state(target, averaged, target.cfg)
    for key, value in target.state_dict().items():
        assert value.dtype == source.state_dict()[key].dtype
    assert target.backbone.bn1.num_batches_tracked.item() == 7
    x, mask = padded_batch([3])
    with torch.no_grad():
        torch.testing.assert_close(target(x, mask), source(x, mask))


def test_load_travelling_state_is_strict() -> None:
    model = tiny_model()
    state = travelling_state(model, model.cfg)
    with pytest.raises(KeyError, match="head.bias"):
        load_travelling_state(
            model, {k: v for k, v in state.items() if k != "head.bias"}, model.cfg
        )
    with pytest.raises(ValueError, match="head.weight"):
        load_travelling_state(model, {**state, "head.weight": torch.zeros(2, 2)}, model.cfg)


def test_bn_state_keys_name_every_batchnorm_entry() -> None:
    model = tiny_model()
    norms = [m for m in model.modules() if isinstance(m, BATCH_NORMS)]
    keys = bn_state_keys(model)
    assert len(keys) == 5 * len(norms) > 0
    assert {"backbone.bn1.weight", "backbone.bn1.running_var"} <= keys
    assert keys <= set(model.state_dict())


@pytest.mark.parametrize(("backbone", "norm"), [(TINY, "group"), ("test_efficientnet_gn", "batch")])
def test_group_norm_variants_have_no_batchnorm(backbone: str, norm: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, norm=norm))
    assert not any(isinstance(m, BATCH_NORMS) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert bn_state_keys(model) == set()
    x, mask = padded_batch([2, 3])
    model.train()
    model(x, mask).sum().backward()


def test_pretrained_weights_from_a_whole_model_file(tmp_path: Path) -> None:
    source = tiny_model(seed=0)
    path = tmp_path / "source.safetensors"
    save_file(contiguous_state(source), str(path))
    loaded = tiny_model(seed=1, pretrained_weights=str(path))
    x, mask = padded_batch([2, 4])
    with torch.no_grad():
        torch.testing.assert_close(loaded.features(x, mask), source.features(x, mask))
    assert not torch.equal(loaded.head.weight, source.head.weight)  # the head is not loaded


def test_pretrained_weights_from_a_timm_file_into_group_norm(tmp_path: Path) -> None:
    source = tiny_model(seed=0)
    with torch.no_grad():
        source.backbone.bn1.weight.uniform_(0.5, 2.0)
    timm_state = {**contiguous_state(source.backbone), "classifier.weight": torch.zeros(10, 256)}
    path = tmp_path / "imagenet.pth"
    torch.save(timm_state, path)
    loaded = tiny_model(seed=1, pretrained_weights=str(path), norm="group")
    assert isinstance(loaded.backbone.bn1, nn.GroupNorm)
    assert isinstance(loaded.backbone.bn1.act, nn.SiLU)
    torch.testing.assert_close(loaded.backbone.bn1.weight, source.backbone.bn1.weight)
    torch.testing.assert_close(loaded.backbone.conv_stem.weight, source.backbone.conv_stem.weight)


def test_pretrained_weights_errors_name_the_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    other = build_model(ModelConfig(backbone="test_efficientnet_gn"))
    wrong = tmp_path / "wrong.safetensors"
    save_file(contiguous_state(other), str(wrong))
    with pytest.raises(WeightsError, match=r"wrong\.safetensors.*missing.*running_mean"):
        tiny_model(pretrained_weights=str(wrong))
    for name, content in (
        ("garbage.pt", "not a checkpoint"),
        ("empty.pt", ""),
        ("bad.safetensors", "x"),
    ):
        (tmp_path / name).write_text(content)
        with pytest.raises(WeightsError, match=name.replace(".", r"\.")):
            tiny_model(pretrained_weights=str(tmp_path / name))
    with pytest.raises(WeightsError, match=r"weights\.bin"):
        tiny_model(pretrained_weights=str(tmp_path / "weights.bin"))


@pytest.mark.parametrize(
    "options",
    [
        {"pool": "sum"},
        {"norm": "layer"},
        {"slice_chunk": 0},
        {"dropout": 1.0},
    ],
)
def test_config_rejects_bad_options(options: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ModelConfig(backbone=TINY, **options)
